"""Loading an EAGLE-3 training checkpoint. Writing goes through training/checkpoint.py's
`save_checkpoint` unchanged (the draft has `save`, and its weights land in the folder's `heads/`).

`checkpoint.load_checkpoint` reads Medusa heads only; this is its counterpart for a draft, with
the same checks in the same order: every file is read and checked before anything is restored,
so a refused checkpoint leaves the optimizer and scheduler as they were. Errors name the file.
(When checkpoint.py takes a weights-loader argument, this module shrinks to that call.)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file

from medusaforge.drafters.eagle3 import load_draft
from medusaforge.training.checkpoint import COMPLETE_MARKER, set_rng_state
from medusaforge.training.common import find_resume_checkpoint

WEIGHTS_FOLDER = "heads"  # the name save_checkpoint gives the trained module's folder


def load_draft_checkpoint(directory: Path, embed_tokens, optimizer=None, scheduler=None, restore_rng: bool = True, rank: int = 0):
    """(draft, training state dict) from a checkpoint folder; optimizer/scheduler/RNG restored in place."""
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
    try:
        draft = load_draft(directory / WEIGHTS_FOLDER, embed_tokens)
    except (FileNotFoundError, SafetensorError, OSError) as error:
        raise ValueError(f"{directory / WEIGHTS_FOLDER}: unreadable draft ({error})") from None
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
        try:
            optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
        except (KeyError, ValueError) as error:
            raise ValueError(f"{path}: optimizer state does not fit this run's draft ({error})") from None
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        set_rng_state(per_rank[rank] if rank < len(per_rank) else per_rank[0])
    return draft, state


def resume_draft(config, out: Path, draft, optimizer, scheduler, schedule: dict, log, rank: int = 0) -> tuple[int, int]:
    """setup.resume for a draft: restore it, the optimizer, scheduler and RNG from --resume ('auto':
    the newest complete checkpoint, falling back past damaged ones). -> (start step, NaN/inf steps
    skipped so far); (0, 0) without --resume. A checkpoint from another data order or schedule is refused."""
    if not config.resume:
        return 0, 0
    candidates = find_resume_checkpoint(out, config.resume)
    if not candidates:
        log(f"resume auto: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
    for checkpoint in candidates:
        try:
            resumed, state = load_draft_checkpoint(checkpoint, draft.embed_tokens, optimizer, scheduler, rank=rank)
        except ValueError as error:
            if config.resume != "auto" or checkpoint == candidates[-1]:
                raise
            log(f"resume auto: skipping damaged checkpoint: {error}")
            continue
        saved_schedule = state["extra"].get("schedule", schedule)
        if saved_schedule != schedule:
            changed = {k: (saved_schedule.get(k), v) for k, v in schedule.items() if saved_schedule.get(k) != v}
            raise ValueError(f"{checkpoint}: was written by a run with a different data order or LR schedule "
                             f"(checkpoint, now): {changed}; an exact resume needs the same settings")
        draft.load_state_dict(resumed.state_dict())
        log(f"resumed from {checkpoint} at step {state['step']}")
        return state["step"], int(state["extra"].get("skipped_nonfinite", 0))
    return 0, 0
