"""Training checkpoints: heads + optimizer + scheduler + step + RNG, written atomically, no pickle.

Layout of `OUT/checkpoints/step-000120/`:
  heads/                      heads.safetensors + config.json (loadable on its own)
  optimizer.safetensors       every tensor of optimizer.state_dict()["state"]
  training_state.json         step, scheduler state, param_groups, RNG states, anything extra

The folder is built under a temporary name and renamed when complete, so a crash mid-save never
leaves a checkpoint that loads; `COMPLETE` is written last as a second guard.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .heads import load_heads, replace_directory

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "COMPLETE"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.cpu().numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]]
        )


def save_checkpoint(directory: Path, heads, optimizer, scheduler, step: int, extra: dict | None = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        heads.save(staging / "heads")
        tensors, optimizer_meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(staging / "optimizer.safetensors"))
        state = {
            "step": step,
            "optimizer": optimizer_meta,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": _rng_state(),
            "extra": extra or {},
        }
        (staging / "training_state.json").write_text(json.dumps(state, indent=1, default=str))
        (staging / COMPLETE_MARKER).write_text(str(step))
        replace_directory(staging, directory)
    except OSError as error:
        raise OSError(f"{directory}: could not write checkpoint ({error}); the previous checkpoint is untouched") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_checkpoint(directory: Path, optimizer=None, scheduler=None, base=None, restore_rng: bool = True):
    """Load (heads, state dict) from a checkpoint folder, restoring optimizer/scheduler/RNG in place."""
    directory = Path(directory)
    if not (directory / COMPLETE_MARKER).is_file():
        raise ValueError(f"{directory}: incomplete checkpoint (no {COMPLETE_MARKER} marker); it was not fully written")
    try:
        state = json.loads((directory / "training_state.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{directory / 'training_state.json'}: unreadable ({error})") from None
    heads = load_heads(directory / "heads", base=base)
    if optimizer is not None:
        path = directory / "optimizer.safetensors"
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: corrupt or truncated ({error})") from None
        per_param: dict[int, dict] = {}
        for key, value in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
            param_id, name = key.split(".", 1)
            per_param.setdefault(int(param_id), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        _set_rng_state(state["rng"])
    return heads, state


def list_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for child in checkpoints_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def prune_checkpoints(checkpoints_dir: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(checkpoints_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file so readers see either the old or the new contents, never a mix."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False)
    with handle:
        handle.write(text)
    os.replace(handle.name, path)
