"""Pieces shared by the training recipes (medusa1.py, medusa2.py, eagle3.py): data split and order,
the LR schedule, checkpoint writing and held-out evaluation of Medusa heads.

Each is small and pure where it can be, so the recipes themselves read top to bottom.
"""

from __future__ import annotations

import math
import random
from contextlib import nullcontext
from pathlib import Path

import torch

from medusaforge.training.batches import micro_batch_plan
from medusaforge.training.checkpoint import checkpoint_name, list_checkpoints, prune_checkpoints, rng_state, save_checkpoint
from medusaforge.training.distributed import DistributedContext, all_gather_objects, all_reduce_sum, barrier, placeholder_slice
from medusaforge.training.loss import medusa_head_losses
from medusaforge.models import resolve_dtype


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast where the device runs bf16 natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32.
    Weights, gradients and optimizer state stay fp32 either way."""
    if resolve_dtype(dtype, device) == torch.bfloat16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def split_examples(num_examples: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of example indices into (train, held-out)."""
    order = list(range(num_examples))
    random.Random(seed).shuffle(order)
    num_eval = int(round(num_examples * eval_fraction)) if eval_fraction > 0 else 0
    if eval_fraction > 0 and num_examples > 1:
        num_eval = min(max(num_eval, 1), num_examples - 1)
    return sorted(order[num_eval:]), sorted(order[:num_eval])


def batch_schedule(train_indices: list[int], batch_size: int, num_batches: int, seed: int) -> list[list[int]]:
    """The first `num_batches` micro-batches of `batch_size` conversations, fixed up front from the
    seed: epoch e uses its own shuffle, so the data position after a resume is just the step number."""
    plan = micro_batch_plan([], train_indices, seed, batch_size, batch_tokens=None)
    return [plan[i] for i in range(num_batches)]


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear 0->1 over warmup, then cosine 1->min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def find_resume_checkpoint(out: Path, resume: str) -> list[Path]:
    """Checkpoints to try, best first: the named folder, or for 'auto' every complete one in
    OUT/checkpoints, newest first (a damaged newest one falls back to the one before)."""
    if resume != "auto":
        return [Path(resume)]
    return list(reversed(list_checkpoints(out / "checkpoints")))


def schedule_fingerprint(config, num_train: int, total_steps: int) -> dict:
    """What fixes the data order and LR schedule; a resume must match it to continue exactly."""
    fingerprint = {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "total_steps": total_steps,
        "train_conversations": num_train,
    }
    if getattr(config, "batch_tokens", None):  # absent otherwise, so checkpoints made before still match
        fingerprint["batch_tokens"] = config.batch_tokens
    return fingerprint


def write_checkpoint(out: Path, step: int, heads, optimizer, scheduler, extra: dict, keep_last: int, context: DistributedContext,
                     base_tensors: dict | None = None) -> None:
    """Every rank hands in its RNG state; rank 0 writes the folder and prunes old ones."""
    rng_per_rank = all_gather_objects(rng_state(), context)
    if context.is_main:
        save_checkpoint(out / "checkpoints" / checkpoint_name(step), heads, optimizer, scheduler, step, extra, rng_per_rank, base_tensors)
        prune_checkpoints(out / "checkpoints", keep_last)
    barrier(context)


def rank_batch(source, global_indices: list[int], context: DistributedContext) -> dict:
    """This rank's slice of a global batch, collated. A rank the slice leaves empty gets a
    placeholder example with a zero loss mask, so every rank still runs the same collectives."""
    indices, placeholder = placeholder_slice(global_indices, context.rank, context.world_size)
    batch = source.collate(indices)
    if placeholder:
        batch["loss_mask"].zero_()
    return batch


@torch.no_grad()
def evaluate_heads(heads, source, indices: list[int], batch_size: int, device, autocast, chunk_size: int, context: DistributedContext | None = None) -> dict:
    """Held-out per-head loss and top-1/top-5 accuracy over target (assistant) tokens, with hidden
    states from `source` (sources.py: the base online, or a cache). Under torchrun each rank
    evaluates its slice of every batch and the sums are all-reduced.

    The loss is over the targets the head vocabulary can predict (all of them for full-vocabulary
    heads), so it compares across vocabulary sizes; `outside` is the share of targets a truncated
    vocabulary cannot predict, and accuracy counts those as misses, as decoding does."""
    context = context or DistributedContext(device=torch.device(device))
    # Rows: token loss sum, predictable targets, top-1 hits, top-5 hits, targets; one column per head.
    totals = torch.zeros(5, heads.num_heads, dtype=torch.float64)
    for start in range(0, len(indices), batch_size):
        batch = {k: v.to(device) for k, v in rank_batch(source, indices[start : start + batch_size], context).items()}
        with autocast:
            hidden = source.hidden_states(batch)
            result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], chunk_size)
        totals += torch.stack([result.token_loss_sums, result.predictable, result.top1, result.top5, result.counts]).double().cpu()
    all_reduce_sum(totals, context)
    loss_total, predictable, top1, top5, counts = totals
    denominator = counts.clamp(min=1)
    return {
        "num_tokens": counts.tolist(),
        "loss": (loss_total / predictable.clamp(min=1)).tolist(),
        "outside": (1 - predictable / denominator).tolist(),
        "top1": (top1 / denominator).tolist(),
        "top5": (top5 / denominator).tolist(),
    }


def format_held_out(held_out: dict) -> str:
    """'head0: top1=0.512 top5=0.801  head1: ...' for the final line of a run, then the loss over
    predictable targets and, where a truncated vocabulary misses some, their share."""
    heads = "  ".join(
        f"head{k}: top1={top1:.3f} top5={top5:.3f}" for k, (top1, top5) in enumerate(zip(held_out["top1"], held_out["top5"]))
    )
    losses = " ".join(f"{loss:.3f}" for loss in held_out["loss"])
    outside = max(held_out.get("outside", [0.0]))
    return heads + f"\n  loss over predictable targets: {losses}" + (f"; targets outside the head vocabulary: up to {outside:.2%}" if outside > 0 else "")
