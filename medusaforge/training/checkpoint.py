"""Training checkpoints: heads + optimizer + scheduler + step + RNG, written atomically, no pickle.

Layout of `OUT/checkpoints/step-000120/`:
  heads/                      heads.safetensors + config.json (loadable on its own)
  optimizer.safetensors       every tensor of optimizer.state_dict()["state"]
  base.safetensors            Medusa-2 only: the base's trainable weights (LoRA adapters, or all
                              of them with --base-train full), by parameter name
  training_state.json         step, scheduler state, param_groups, RNG states (one per rank),
                              and `extra` (data position, schedule, skipped-step count)

The folder is built under a temporary name and renamed when complete, so a crash mid-save never
leaves a checkpoint that loads; `COMPLETE` is written last as a second guard. Weights that are
not finite are refused, so a NaN never reaches a checkpoint.
"""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.files import atomic_write_text, staging_directory

CHECKPOINT_PATTERN = re.compile(r"^step-(\d+)$")
COMPLETE_MARKER = "COMPLETE"
OPTIMIZER_FILE = "optimizer.safetensors"
BASE_FILE = "base.safetensors"  # Medusa-2 only: the base model's trainable weights, by parameter name


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


def rng_state() -> dict:
    """This process's RNG states as JSON-friendly values (torch CPU, CUDA, Python's `random`)."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "python": json.loads(json.dumps(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.cpu().numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]]
        )


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of parameters holding a NaN or inf (a CPU-GPU sync per parameter; only at save time)."""
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]


def save_checkpoint(
    directory: Path,
    heads,
    optimizer,
    scheduler,
    step: int,
    extra: dict | None = None,
    rng_per_rank: list[dict] | None = None,
    base_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder atomically. `rng_per_rank` holds every rank's `rng_state()`
    (gathered by the caller under torchrun); by default, this process's. `base_tensors` are the
    base model's trainable weights by parameter name (Medusa-2: LoRA adapters, or the whole base)."""
    directory = Path(directory)
    bad = non_finite_parameters(heads) + [name for name, t in (base_tensors or {}).items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise RuntimeError(f"{directory}: not saved, the trained weights hold NaN/inf values ({', '.join(bad[:3])})")
    rng_per_rank = rng_per_rank or [rng_state()]
    try:
        with staging_directory(directory) as staging:
            heads.save(staging / "heads")
            tensors, optimizer_meta = _optimizer_tensors(optimizer)
            save_file(tensors, str(staging / OPTIMIZER_FILE))
            if base_tensors is not None:
                save_file({n: t.detach().contiguous().cpu() for n, t in base_tensors.items()}, str(staging / BASE_FILE))
            state = {
                "step": step,
                "optimizer": optimizer_meta,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_per_rank[0],
                "rng_per_rank": rng_per_rank,
                "extra": extra or {},
            }
            (staging / "training_state.json").write_text(json.dumps(state, indent=1, default=str))
            (staging / COMPLETE_MARKER).write_text(str(step))  # last: its presence means every file is there
    except OSError as error:
        raise OSError(f"{directory}: could not write checkpoint ({error}); the previous checkpoint is untouched") from error
    return directory


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"{path}: missing from the checkpoint") from None
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: corrupt or truncated ({error})") from None


def _check_base_tensors(path: Path, tensors: dict[str, torch.Tensor], parameters: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise ValueError(f"{path}: does not fit this run's trainable base weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != parameters[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(tensor.shape)}, this run's is {tuple(parameters[name].shape)}")


def load_checkpoint(directory: Path, optimizer=None, scheduler=None, base=None, restore_rng: bool = True, rank: int = 0,
                    trainable_base: torch.nn.Module | None = None, load_weights=None):
    """Load (heads, state dict) from a checkpoint folder, restoring optimizer/scheduler/RNG in place,
    and with `trainable_base`, that module's trainable parameters (Medusa-2) from base.safetensors.
    `load_weights(folder)` reads the trained module for drafters other than Medusa heads (EAGLE-3).

    Every file is checked before anything is restored, so a refused checkpoint leaves the
    optimizer, scheduler and base as they were. Errors name the file.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such checkpoint folder")
    if not (directory / COMPLETE_MARKER).is_file():
        raise ValueError(f"{directory}: incomplete checkpoint (no {COMPLETE_MARKER} marker); it was not fully written")
    state_path = directory / "training_state.json"
    try:
        state = json.loads(state_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{state_path}: unreadable ({error})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("optimizer"), dict):
        raise ValueError(f"{state_path}: not a medusaforge training state (needs 'step' and 'optimizer')")
    if load_weights is None:
        heads = load_heads(directory / "heads", base=base)
    else:
        try:
            heads = load_weights(directory / "heads")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{directory / 'heads'}: unreadable weights ({error})") from None
    base_tensors = base_parameters = None
    if trainable_base is not None:
        base_parameters = {n: p for n, p in trainable_base.named_parameters() if p.requires_grad}
        base_tensors = _read_tensors(directory / BASE_FILE)
        _check_base_tensors(directory / BASE_FILE, base_tensors, base_parameters)
    if optimizer is not None:
        path = directory / OPTIMIZER_FILE
        tensors = _read_tensors(path)
        per_param: dict[int, dict] = {}
        for key, value in list(tensors.items()) + list(state["optimizer"]["scalars"].items()):
            param_id, name = key.split(".", 1)
            per_param.setdefault(int(param_id), {})[name] = value
        try:
            optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: optimizer state does not fit this run's heads ({error})") from None
    if base_tensors is not None:
        with torch.no_grad():
            for name, parameter in base_parameters.items():
                parameter.copy_(base_tensors[name])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        # A resume on a different number of ranks reuses rank 0's state for the new ranks.
        set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
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


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep metrics.jsonl lines up to `last_step` (the resumed checkpoint's step), so the file reads
    as one uninterrupted run after a resume. Drops a torn last line. Returns the lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= last_step
        except (json.JSONDecodeError, TypeError, ValueError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"

