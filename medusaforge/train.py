"""`medusaforge train`: the training loop, written out top to bottom.

Medusa-1: the base model is frozen (eval mode, no grad); each step runs it once to get the final
hidden states, then trains the heads on them. The loop is deliberately plain: build everything,
then `for step in range(...)`: forward, loss, backward, clip, step, log, save.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import (
    atomic_write_text,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from .config import config_to_dict, option
from .data import TokenizedData, collate, load_tokenized
from .heads import MedusaHeads, load_heads
from .loss import default_head_weights, medusa_head_losses
from .models import (
    DEFAULT_MODEL,
    base_fingerprint,
    final_hidden_states,
    lm_head_of,
    load_base_model,
    load_tokenizer,
    model_name,
    resolve_device,
    resolve_dtype,
)


@dataclass
class TrainConfig:
    """Train Medusa heads on a chat JSONL file (ShareGPT or OpenAI messages)."""

    model: str = option(DEFAULT_MODEL, "base model: local HF folder, hub id, or the built-in smollm2-135m-instruct")
    data: Path | None = option(None, "training data: JSONL (ShareGPT or OpenAI messages)")
    out: Path = option(Path("runs/train"), "output folder: heads/, checkpoints/, metrics.jsonl, summary.json")
    num_heads: int = option(4, "number of Medusa heads (head k predicts token t+k+2)")
    num_layers: int = option(1, "ResBlocks per head")
    head_weights: list[float] | None = option(None, "loss weight per head (default: decay**k)")
    head_weight_decay: float = option(0.8, "per-head loss weight decay used when --head-weights is not given")
    max_length: int = option(1024, "truncate each conversation to this many tokens")
    batch_size: int = option(8, "conversations per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    epochs: float = option(1.0, "passes over the training split (fractions allowed)")
    max_steps: int | None = option(None, "stop after this many optimizer steps (overrides --epochs)")
    lr: float = option(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.05, "fraction of steps spent in linear warmup before the cosine decay")
    min_lr_ratio: float = option(0.0, "cosine decays to lr * this")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 disables)")
    eval_fraction: float = option(0.1, "share of conversations held out for the final evaluation")
    chunk_size: int = option(512, "tokens per chunk in the head loss (peak memory ~ chunk * vocab * 4 bytes)")
    seed: int = option(0, "random seed (data order, split)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = option("auto", "compute dtype: auto (bf16 autocast where the device runs bf16 natively, else fp32), fp32 or bf16", choices=["auto", "fp32", "bf16"])
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "keep this many checkpoints")
    log_every: int = option(1, "write metrics every N steps")
    skip_invalid: bool = option(False, "skip bad records (counted and reported) instead of stopping")
    init_heads: Path | None = option(None, "start from these heads instead of copies of the base lm_head")
    shared_lm_head: bool = option(False, "every head reuses the frozen base lm_head; only the ResBlocks train")
    overwrite: bool = option(False, "allow writing into a non-empty --out")
    resume: str | None = option(None, "resume from a checkpoint folder, or 'auto' for the newest in --out")
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder (off by default)")
    progress: bool = option(True, "show a progress bar")

    def validate(self) -> None:
        if self.data is None:
            raise ValueError("--data is required")
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError("--num-heads must be >= 1 and --num-layers >= 0")
        if self.head_weights is not None and len(self.head_weights) != self.num_heads:
            raise ValueError(f"--head-weights has {len(self.head_weights)} values for {self.num_heads} heads")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("--eval-fraction must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.chunk_size < 1:
            raise ValueError("--batch-size, --grad-accum and --chunk-size must be >= 1")


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
    """The micro-batches of the whole run, fixed up front from the seed: epoch e uses its own
    shuffle, so the data position after a resume is just the step number."""
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < num_batches:
        order = list(train_indices)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        batches.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
        epoch += 1
    return batches[:num_batches]


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear 0->1 over warmup, then cosine 1->min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def prepare_output_dir(out: Path, overwrite: bool, resume: str | None) -> None:
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise FileExistsError(f"{out} is not empty; pass --overwrite to write into it or --resume to continue")
    out.mkdir(parents=True, exist_ok=True)


@torch.no_grad()
def evaluate_heads(heads, base, data: TokenizedData, indices: list[int], batch_size: int, pad_token_id: int, device, autocast, chunk_size: int) -> dict:
    """Held-out per-head loss and top-1/top-5 accuracy over target (assistant) tokens."""
    num_heads = heads.num_heads
    loss_total = torch.zeros(num_heads)
    top1 = torch.zeros(num_heads)
    top5 = torch.zeros(num_heads)
    counts = torch.zeros(num_heads)
    for start in range(0, len(indices), batch_size):
        batch = collate([data.example(i) for i in indices[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast:
            hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])
            result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], chunk_size)
        loss_total += torch.stack([s.detach().float().cpu() for s in result.loss_sums])
        top1 += result.top1.cpu()
        top5 += result.top5.cpu()
        counts += result.counts.cpu()
    denominator = counts.clamp(min=1)
    return {
        "num_tokens": counts.tolist(),
        "loss": (loss_total / denominator).tolist(),
        "top1": (top1 / denominator).tolist(),
        "top5": (top5 / denominator).tolist(),
    }


def run(config: TrainConfig) -> dict:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    prepare_output_dir(out, config.overwrite, config.resume)
    autocast = autocast_for(device, config.dtype)

    # ---- base model (frozen) and data ----
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
    base.requires_grad_(False)
    data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid)
    train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
    print(
        f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens, {data.num_invalid} invalid records skipped",
        file=sys.stderr,
    )

    # ---- heads, optimizer, schedule ----
    lm_head_weight = lm_head_of(base).weight
    if config.init_heads is not None:
        heads = load_heads(config.init_heads, base=base)
        if heads.num_heads != config.num_heads:
            print(f"init heads: using {heads.num_heads} heads from {config.init_heads}", file=sys.stderr)
    else:
        heads = MedusaHeads(
            lm_head_weight.shape[1],
            lm_head_weight.shape[0],
            config.num_heads,
            config.num_layers,
            shared_lm_head=config.shared_lm_head,
        )
        heads.init_from_base(lm_head_weight)
    heads.config.base_model = model_name(base)
    heads.config.base_fingerprint = base_fingerprint(base)
    heads.to(device)
    num_heads = heads.num_heads
    head_weights = config.head_weights or default_head_weights(num_heads, config.head_weight_decay)

    steps_per_epoch = max(1, math.ceil(len(train_indices) / config.batch_size / config.grad_accum))
    total_steps = config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))
    warmup_steps = max(1, int(total_steps * config.warmup_ratio))
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, config.min_lr_ratio)
    )
    micro_batches = batch_schedule(train_indices, config.batch_size, total_steps * config.grad_accum, config.seed)

    start_step = 0
    if config.resume:
        if config.resume == "auto":
            complete = list_checkpoints(out / "checkpoints")
            if not complete:
                raise FileNotFoundError(f"{out / 'checkpoints'}: no complete checkpoint to resume from")
            checkpoint = complete[-1]
        else:
            checkpoint = Path(config.resume)
        # The optimizer state maps onto parameters by position, so it can be loaded before the
        # checkpoint's weights are copied into our (already registered) head parameters.
        resumed, state = load_checkpoint(checkpoint, optimizer=optimizer, scheduler=scheduler, base=base)
        heads.load_state_dict(resumed.state_dict())
        start_step = state["step"]
        print(f"resumed from {checkpoint} at step {start_step}", file=sys.stderr)

    (out / "train_config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "a" if config.resume else "w")
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not config.progress, desc="train")
    heads.train()
    started = time.perf_counter()
    tokens_seen = 0

    # ---- the loop ----
    for step in progress:
        batches = [
            collate([data.example(i) for i in micro_batches[step * config.grad_accum + j]], tokenizer.pad_token_id)
            for j in range(config.grad_accum)
        ]
        # Normalise by the target-token count of the whole optimizer step, so accumulation (and,
        # later, data parallelism) gives exactly the loss of one big batch.
        step_counts = torch.zeros(num_heads)
        for batch in batches:
            for k in range(num_heads):
                step_counts[k] += (batch["loss_mask"][:, k + 2 :]).sum()
        step_counts = step_counts.clamp(min=1)

        loss_value = 0.0
        head_loss = torch.zeros(num_heads)
        head_top1 = torch.zeros(num_heads)
        head_top5 = torch.zeros(num_heads)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                with torch.no_grad():
                    hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])
                result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], config.chunk_size)
                loss = sum(head_weights[k] * result.loss_sums[k] / step_counts[k] for k in range(num_heads))
            loss.backward()
            loss_value += float(loss.detach())  # a host-device sync; once per micro-batch is fine
            head_loss += torch.stack([s.detach().float().cpu() for s in result.loss_sums]) / step_counts
            head_top1 += result.top1.cpu() / step_counts
            head_top5 += result.top5.cpu() / step_counts
            tokens_seen += int(batch["attention_mask"].sum())

        if not math.isfinite(loss_value):
            raise RuntimeError(f"step {step}: loss is {loss_value}; stopping before the heads are damaged (no checkpoint written)")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        progress.set_postfix(loss=f"{loss_value:.3f}", acc0=f"{head_top1[0]:.3f}")
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            record = {
                "step": step + 1,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "head_loss": head_loss.tolist(),
                "head_top1": head_top1.tolist(),
                "head_top5": head_top5.tolist(),
                "tokens_per_s": tokens_seen / (time.perf_counter() - started),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(out / "checkpoints" / checkpoint_name(step + 1), heads, optimizer, scheduler, step + 1)
            prune_checkpoints(out / "checkpoints", config.keep_last)
    metrics_file.close()
    elapsed = time.perf_counter() - started

    # ---- save and evaluate ----
    save_checkpoint(out / "checkpoints" / checkpoint_name(total_steps), heads, optimizer, scheduler, total_steps)
    prune_checkpoints(out / "checkpoints", config.keep_last)
    heads.save(out / "heads")
    heads.eval()
    held_out = (
        evaluate_heads(heads, base, data, eval_indices, config.batch_size, tokenizer.pad_token_id, device, autocast, config.chunk_size)
        if eval_indices
        else None
    )
    summary = {
        "model": heads.config.base_model,
        "data": str(config.data),
        "num_heads": num_heads,
        "num_layers": heads.config.num_layers,
        "steps": total_steps,
        "train_conversations": len(train_indices),
        "eval_conversations": len(eval_indices),
        "train_seconds": round(elapsed, 1),
        "invalid_records_skipped": data.num_invalid,
        "held_out": held_out,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if held_out is not None:
        figures = "  ".join(
            f"head{k}: top1={held_out['top1'][k]:.3f} top5={held_out['top5'][k]:.3f}" for k in range(num_heads)
        )
        print(f"held-out accuracy ({len(eval_indices)} conversations): {figures}")
    print(f"heads saved to {out / 'heads'}")
    return summary
