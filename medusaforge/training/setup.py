"""Setup shared by the training recipes, carved out of their loops so each loop reads top to bottom:
the output folder, the base model and data, the heads, the optimizer and LR schedule, resume, and
one optimizer step with the NaN/inf rule. Each helper does one thing and returns what it built.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from medusaforge.config import config_to_dict
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.drafters.vocab import most_frequent_tokens, target_token_counts
from medusaforge.files import atomic_write_text, refuse_non_empty
from medusaforge.interop.importer import import_heads
from medusaforge.training.batches import MicroBatchPlan, micro_batch_plan, steps_for_epochs
from medusaforge.training.budget import StepBudget
from medusaforge.training.checkpoint import load_checkpoint, truncate_metrics
from medusaforge.training.common import batch_schedule, cosine_with_warmup, find_resume_checkpoint
from medusaforge.training.distributed import DistributedContext, barrier


def prepare_output(config, context: DistributedContext) -> Path:
    """Refuse a non-empty --out (unless --overwrite or --resume), then create it on rank 0. Every
    rank checks before any rank writes, so all of them see the same folder and agree."""
    out = Path(config.out)
    refuse_non_empty(out, bool(config.overwrite or config.resume), hint="pass --overwrite to write into it or --resume to continue")
    barrier(context)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    return out


def make_logger(context: DistributedContext):
    def log(message: str) -> None:
        if context.is_main:
            print(message, file=sys.stderr)

    return log


def build_heads(config, lm_head_weight: torch.Tensor, base, log, target_counts=None) -> tuple[MedusaHeads, float | None]:
    """--init-heads (any layout, checked against `base` when there is one), else fresh heads copied
    from the base lm_head; with --head-vocab, projecting onto the most frequent training targets
    (`target_counts` [vocab]). -> (heads, share of training targets the head vocabulary covers)."""
    head_vocab = getattr(config, "head_vocab", None)
    if config.init_heads is not None:
        heads = import_heads(config.init_heads, base=base)
        if heads.config.shared_lm_head:
            heads.init_from_base(lm_head_weight)
        if heads.num_heads != config.num_heads:
            log(f"init heads: using {heads.num_heads} heads from {config.init_heads}")
        return heads, None
    vocab_size, hidden_size = lm_head_weight.shape
    heads = MedusaHeads(hidden_size, vocab_size, config.num_heads, config.num_layers,
                        shared_lm_head=config.shared_lm_head, head_vocab_size=head_vocab)
    coverage = None
    if head_vocab is not None and heads.token_map is not None:
        token_map, coverage = most_frequent_tokens(target_counts, head_vocab)
        heads.token_map.copy_(token_map)
        log(f"head vocabulary: {head_vocab} of {vocab_size} tokens cover {coverage:.1%} of training target tokens")
    heads.init_from_base(lm_head_weight)
    return heads, coverage


def training_target_counts(data, train_indices: list[int], vocab_size: int) -> torch.Tensor:
    """[vocab] target-token counts over the training split only, so held-out figures stay honest."""
    ids = torch.cat([data.example(i)[0] for i in train_indices])
    mask = torch.cat([data.example(i)[1] for i in train_indices])
    return target_token_counts(ids, mask, vocab_size)


def total_steps_of(config, num_train: int) -> int:
    steps_per_epoch = max(1, math.ceil(num_train / config.batch_size / config.grad_accum))
    return config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))


def optimizer_and_schedule(param_groups: list[dict], config, total_steps: int, budget: StepBudget | None = None):
    """AdamW over `param_groups` (each with its own peak lr) and one warmup+cosine multiplier for all;
    with a `budget`, the multiplier follows the budget's current total (which a time budget shrinks)."""
    optimizer = torch.optim.AdamW(param_groups, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    if budget is not None:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, budget.lr_multiplier)
    warmup_steps = max(1, int(total_steps * config.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, config.min_lr_ratio)
    )
    return optimizer, scheduler


def micro_batches_of(config, train_indices: list[int], total_steps: int) -> list[list[int]]:
    return batch_schedule(train_indices, config.batch_size, total_steps * config.grad_accum, config.seed)


def plan_and_budget(config, lengths: list[int], train_indices: list[int]) -> tuple[MicroBatchPlan, StepBudget]:
    """The run's micro-batches (in conversations or, with --batch-tokens, in tokens) and its step
    budget: --max-steps, else --epochs passes, of which --max-minutes keeps those that fit."""
    plan = micro_batch_plan(lengths, train_indices, config.seed, config.batch_size, config.batch_tokens)
    planned = config.max_steps or steps_for_epochs(plan, config.epochs, config.grad_accum)
    return plan, StepBudget(planned, config.max_minutes, config.warmup_ratio, config.min_lr_ratio)


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def resume(config, out: Path, heads, optimizer, scheduler, schedule: dict, log, rank: int = 0, base=None, trainable_base=None,
           load_weights=None, budget: StepBudget | None = None) -> tuple[int, int]:
    """Restore heads, optimizer, scheduler, RNG (and with `trainable_base`, its trainable weights;
    with `budget`, the step total a time budget had settled on) from --resume.
    -> (start step, NaN/inf steps skipped so far); (0, 0) without --resume."""
    if not config.resume:
        return 0, 0
    candidates = find_resume_checkpoint(out, config.resume)
    if not candidates:
        log(f"resume auto: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
    for checkpoint in candidates:
        try:
            # The optimizer state maps onto parameters by position, so it can be loaded before the
            # checkpoint's weights are copied into our (already registered) parameters.
            resumed, state = load_checkpoint(checkpoint, optimizer, scheduler, base=base, rank=rank, trainable_base=trainable_base,
                                            load_weights=load_weights)
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
        heads.load_state_dict(resumed.state_dict())
        if budget is not None:
            budget.restore(state["extra"].get("budget"))
        log(f"resumed from {checkpoint} at step {state['step']}")
        return state["step"], int(state["extra"].get("skipped_nonfinite", 0))
    return 0, 0


def open_metrics(out: Path, config, start_step: int, recipe: str):
    """Write train_config.json and open metrics.jsonl (rank 0 only). After a resume the lines past
    the resumed step came from the crashed run; they are dropped, re-run and re-logged."""
    atomic_write_text(out / "train_config.json", json.dumps({"mode": recipe, **config_to_dict(config)}, indent=2) + "\n")
    if config.resume:
        truncate_metrics(out / "metrics.jsonl", start_step)
    return open(out / "metrics.jsonl", "a" if config.resume else "w")


def optimizer_step(optimizer, scheduler, parameters, config, step: int, loss_value: float, out: Path) -> tuple[float, bool]:
    """Clip, then step unless the loss or gradient is NaN/inf (refused, or skipped with
    --skip-nonfinite); the schedule advances either way, since it follows the data position.
    -> (gradient norm, whether the step was taken)."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip if config.grad_clip > 0 else float("inf")))
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if not finite and not config.skip_nonfinite:
        raise RuntimeError(
            f"step {step + 1}: loss {loss_value}, gradient norm {grad_norm}: not finite; stopped before "
            f"the weights were updated. The checkpoints in {out / 'checkpoints'} are intact; resume from them, "
            "lower --lr, or pass --skip-nonfinite to skip such steps"
        )
    if finite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def held_out_point(module, evaluate, metrics_file, step: int, started: float) -> float:
    """One point on the convergence curve: held-out top-1 after `step` steps, written to metrics.jsonl
    with the training seconds so far. The evaluation's own time is taken out of the training clock,
    so a curve with points costs the same training time as one without; returns the moved `started`."""
    paused = time.perf_counter()
    module.eval()
    interim = evaluate()
    module.train()
    if metrics_file is not None:
        metrics_file.write(json.dumps({"step": step, "seconds": round(paused - started, 1),
                                       "held_out_top1": interim["top1"], "held_out_loss": interim["loss"]}) + "\n")
        metrics_file.flush()
    return started + time.perf_counter() - paused
