"""Medusa-2 recipe (`medusaforge train --mode medusa2`): the base trains jointly with the heads.

Medusa-2 lets the heads' loss reach into the base model, so the base learns hidden states its heads
can read, while a base loss keeps the base what it was:
    loss = base_weight * L_base + heads_weight(step) * sum_k decay**k * L_k
L_base is either cross entropy on the data or (default) self-distillation, the KL divergence from
the original model's next-token distribution (medusa2_base.py: student, teacher, quality guard).

The two-stage recipe: stage 1 trains the heads alone (`--mode medusa1`), stage 2 starts from them
(`--mode medusa2 --init-heads STAGE1/heads`). Checkpoints (--save-every, --keep-last) hold the
heads, the base's trainable weights (LoRA adapters, or all of them with --base-train full), the
optimizer, schedule and RNG, so `--resume auto` continues a killed run exactly.

Outputs in --out: adapter/ (LoRA, peft format), merged/ (with --merge, or always with
--base-train full: an HF model folder with the tokenizer, loadable with --model), heads/ (their
config's base_fingerprint is the merged model's, so decoding refuses them on the original base),
checkpoints/, metrics.jsonl, summary.json (with the base-quality guard: held-out perplexity before
and after, and the share of held-out greedy next tokens that changed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from medusaforge.config import option
from medusaforge.data.conversations import collate, load_tokenized
from medusaforge.files import atomic_write_text, staging_directory
from medusaforge.models import base_fingerprint, final_hidden_states, lm_head_of, load_base_model, load_tokenizer, model_name, resolve_device, save_model_folder
from medusaforge.training.common import autocast_for, evaluate_heads, format_held_out, schedule_fingerprint, split_examples, write_checkpoint
from medusaforge.training.distributed import DistributedContext
from medusaforge.training.loss import default_head_weights, medusa_head_losses
from medusaforge.training.medusa2_base import base_loss_sum, base_quality, make_lora_student, make_teacher, quality_report
from medusaforge.training.medusa2_loss import HEADS_WEIGHT_SCHEDULES, heads_weight_at
from medusaforge.training.options import BaseModelOptions, DataOptions, EvalOptions, HeadOptions, OptimOptions, OutputOptions
from medusaforge.training.setup import (
    build_heads, held_out_point, make_logger, micro_batches_of, open_metrics, optimizer_and_schedule, optimizer_step, prepare_output, resume,
    total_steps_of,
)
from medusaforge.training.sources import OnlineBatches


@dataclass
class Medusa2Config(OutputOptions, EvalOptions, OptimOptions, HeadOptions, DataOptions, BaseModelOptions):
    """Train the base model (LoRA or full) jointly with Medusa heads (Medusa-2), usually from stage-1 heads."""

    lr: float = option(1e-3, "peak learning rate of the base (AdamW); the heads' is --lr * --heads-lr-multiplier")
    base_train: str = option("lora", "train the base through LoRA adapters or fully (full keeps a teacher copy in memory)", choices=["lora", "full"])
    base_loss: str = option("distill", "L_base = KL from the original model (distill) or cross entropy on the data (ce)", choices=["distill", "ce"])
    base_weight: float = option(1.0, "weight of L_base")
    heads_weight: float = option(0.2, "peak weight of the summed head losses")
    heads_weight_schedule: str = option("sine", "heads-weight warm-up", choices=list(HEADS_WEIGHT_SCHEDULES))
    heads_weight_warmup_ratio: float = option(0.5, "fraction of steps over which the heads weight warms up")
    heads_lr_multiplier: float = option(4.0, "heads lr = --lr * this (--lr is the base's lr)")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha (scale alpha / rank)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names that get LoRA adapters")
    merge: bool = option(False, "also save the base with adapters merged into OUT/merged (loadable with --model)")
    quality_data: Path | None = option(None, "held-out chat JSONL for the base-quality guard (default: the held-out split)")

    def validate(self) -> None:
        if self.data is None:
            raise ValueError("--data is required (--mode medusa2 runs the base, so there is no --cache)")
        self.check_data()
        self.check_heads()
        self.check_optim()
        self.check_output()
        self.check_eval()
        if not 0.0 <= self.heads_weight_warmup_ratio <= 1.0:
            raise ValueError("--heads-weight-warmup-ratio must be in [0, 1]")
        if self.heads_lr_multiplier <= 0 or self.base_weight < 0 or self.heads_weight < 0:
            raise ValueError("--heads-lr-multiplier must be > 0; --base-weight and --heads-weight must be >= 0")
        if self.lora_rank < 1:
            raise ValueError("--lora-rank must be >= 1")
        if {"lm_head", "embed_tokens"} & set(self.lora_target_modules):
            # The losses read lm_head's weight directly (a plain nn.Linear); a LoRA-wrapped one has none.
            raise ValueError("--lora-target-modules: lm_head and embed_tokens cannot take adapters here")


def trainable_base_tensors(base) -> dict[str, torch.Tensor]:
    """The base's trainable weights by name (LoRA adapters, or every weight when training fully)."""
    return {name: p for name, p in base.named_parameters() if p.requires_grad}


def train(config: Medusa2Config) -> dict:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    context = DistributedContext(device=device)  # one process: the base trains on one device
    log = make_logger(context)
    out = prepare_output(config, context)
    autocast = autocast_for(device, config.dtype)

    # ---- base model (fp32 weights, trained under autocast), data, and the guard's "before" ----
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
    base.requires_grad_(False)
    original_name = model_name(base)
    data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=log)
    train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
    quality_data, quality_indices = data, eval_indices
    if config.quality_data is not None:
        quality_data = load_tokenized(config.quality_data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=log)
        quality_indices = list(range(len(quality_data)))
    log(f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens; quality guard on {len(quality_indices)} conversations")
    guard = (quality_data, quality_indices, config.batch_size, tokenizer.pad_token_id, device, autocast, config.chunk_size)
    # Measured on the original base, before any resumed weights are loaded into it.
    quality_before = base_quality(base, *guard) if quality_indices else None

    # ---- heads; the base as student (LoRA or full) and the original as teacher ----
    heads, _ = build_heads(config, lm_head_of(base).weight, base, log)
    heads.to(device)
    num_heads = heads.num_heads
    head_weights = config.head_weights or default_head_weights(num_heads, config.head_weight_decay)
    peft_model = make_lora_student(base, config) if config.base_train == "lora" else None
    if peft_model is None:
        base.requires_grad_(True)
    teacher = make_teacher(base, peft_model, config.base_train) if config.base_loss == "distill" else None
    base_params = list(trainable_base_tensors(base).values())
    head_params = [p for p in heads.parameters() if p.requires_grad]
    log(f"medusa2: {config.base_train} base ({sum(p.numel() for p in base_params):,} trainable), "
        f"{sum(p.numel() for p in head_params):,} head parameters, L_base = {config.base_loss}")

    # ---- optimizer (two learning rates, one schedule multiplier), resume ----
    total_steps = total_steps_of(config, len(train_indices))
    optimizer, scheduler = optimizer_and_schedule(
        [{"params": base_params, "lr": config.lr}, {"params": head_params, "lr": config.lr * config.heads_lr_multiplier}], config, total_steps
    )
    micro_batches = micro_batches_of(config, train_indices, total_steps)
    schedule = schedule_fingerprint(config, len(train_indices), total_steps)
    # Heads are checked by the schedule, not against the base: the base they met has since changed.
    start_step, skipped_steps = resume(config, out, heads, optimizer, scheduler, schedule, log, trainable_base=base)
    metrics_file = open_metrics(out, config, start_step, "medusa2")
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps, disable=not config.progress, desc="medusa2")
    base.train()  # LoRA dropout on; Llama-style decoders have no other dropout by default
    heads.train()
    # --eval-every: the heads on the base as trained so far (adapters unmerged), both in eval mode
    # for the evaluation (no LoRA dropout), then back to train mode.
    evaluate = partial(evaluate_heads, heads, OnlineBatches(base, data, tokenizer.pad_token_id), eval_indices,
                       config.batch_size, device, autocast, config.chunk_size)
    base_and_heads = torch.nn.ModuleList([base, heads])
    started, tokens_seen = time.perf_counter(), 0

    # ---- the loop ----
    for step in progress:
        heads_weight = heads_weight_at(step, total_steps, config.heads_weight, config.heads_weight_schedule, config.heads_weight_warmup_ratio)
        batches = [collate([data.example(i) for i in micro_batches[step * config.grad_accum + j]], tokenizer.pad_token_id)
                   for j in range(config.grad_accum)]
        # Normalise by the target-token counts of the whole optimizer step, as Medusa-1 does.
        head_counts = torch.zeros(num_heads)
        base_count = 0
        for batch in batches:
            for k in range(num_heads):
                head_counts[k] += batch["loss_mask"][:, k + 2 :].sum()
            base_count += int(batch["loss_mask"][:, 1:].sum())
        head_counts, base_count = head_counts.clamp(min=1), max(base_count, 1)

        loss_value = base_loss_value = heads_loss_value = 0.0
        head_top1 = torch.zeros(num_heads)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                # No torch.no_grad() here, unlike Medusa-1: the heads' gradient flows into the base.
                hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])
                result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], config.chunk_size)
                heads_loss = sum(head_weights[k] * result.loss_sums[k] / head_counts[k] for k in range(num_heads))
                base_loss = base_loss_sum(base, hidden, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                                          config.base_loss, teacher, config.chunk_size) / base_count
                loss = config.base_weight * base_loss + heads_weight * heads_loss
            loss.backward()
            # Host-device syncs, once per micro-batch.
            loss_value += float(loss.detach())
            base_loss_value += float(base_loss.detach())
            heads_loss_value += float(heads_loss.detach())
            head_top1 += result.top1.cpu() / head_counts
            tokens_seen += int(batch["attention_mask"].sum())

        grad_norm, finite = optimizer_step(optimizer, scheduler, base_params + head_params, config, step, loss_value, out)
        if not finite:
            skipped_steps += 1
            log(f"step {step + 1}: loss {loss_value}, gradient norm {grad_norm}: not finite, step skipped ({skipped_steps} so far)")

        progress.set_postfix(base=f"{base_loss_value:.4f}", heads=f"{heads_loss_value:.3f}", acc0=f"{head_top1[0]:.3f}")
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            lr_base, lr_heads = scheduler.get_last_lr()
            record = {"step": step + 1, "loss": loss_value, "base_loss": base_loss_value, "heads_loss": heads_loss_value,
                      "heads_weight": heads_weight, "lr_base": lr_base, "lr_heads": lr_heads, "grad_norm": grad_norm,
                      "head_top1": head_top1.tolist(), "skipped": not finite, "tokens_per_s": tokens_seen / (time.perf_counter() - started),
                      "seconds": round(time.perf_counter() - started, 1)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < total_steps and eval_indices:
            started = held_out_point(base_and_heads, evaluate, metrics_file, step + 1, started)
        extra = {"data_position": (step + 1) * config.grad_accum, "schedule": schedule, "skipped_nonfinite": skipped_steps}
        if step + 1 == total_steps or (config.save_every and (step + 1) % config.save_every == 0):
            write_checkpoint(out, step + 1, heads, optimizer, scheduler, extra, config.keep_last, context, trainable_base_tensors(base))
    metrics_file.close()
    elapsed = time.perf_counter() - started
    teacher = None  # frees the full-fine-tuning copy before the merged model is saved

    # ---- save, then evaluate: heads on the new base, and the base against its former self ----
    merged, merged_dir, adapter = save_outputs(config, out, base, peft_model, heads, tokenizer, original_name)
    source = OnlineBatches(merged, data, tokenizer.pad_token_id)
    held_out = evaluate_heads(heads, source, eval_indices, config.batch_size, device, autocast, config.chunk_size) if eval_indices else None
    quality = quality_report(quality_before, base_quality(merged, *guard)) if quality_before is not None else None
    summary = {
        "mode": "medusa2", "model": original_name, "merged_model": str(merged_dir) if merged_dir is not None else None,
        "adapter": adapter, "base_train": config.base_train, "base_loss": config.base_loss, "data": str(config.data),
        "num_heads": num_heads, "num_layers": heads.config.num_layers, "steps": total_steps,
        "train_conversations": len(train_indices), "eval_conversations": len(eval_indices), "train_seconds": round(elapsed, 1),
        "invalid_records_skipped": data.num_invalid, "nonfinite_steps_skipped": skipped_steps, "held_out": held_out, "base_quality": quality,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_result(summary, out, len(eval_indices))
    return summary


def save_outputs(config, out: Path, base, peft_model, heads, tokenizer, original_name: str):
    """Save the adapters, the merged base (with --merge, or always when trained fully), and the
    heads stamped with the merged base's fingerprint. -> (merged model, its folder or None, adapter folder or None)."""
    base.eval()
    heads.eval()
    adapter = None
    if peft_model is not None:
        adapter = str(out / "adapter")
        with staging_directory(out / "adapter") as staging:
            peft_model.save_pretrained(staging)
        merged = peft_model.merge_and_unload()  # folds B @ A * alpha / r into the base weights
    else:
        merged = base
    merged.requires_grad_(False)
    merged_dir = out / "merged" if (config.merge or peft_model is None) else None
    if merged_dir is not None:
        save_model_folder(merged, tokenizer, merged_dir)
    heads.config.base_fingerprint = base_fingerprint(merged)
    heads.config.base_model = str(merged_dir.resolve()) if merged_dir is not None else original_name
    heads.config.extra = {**heads.config.extra, "medusa2": {"original_base": original_name, "base_train": config.base_train, "adapter": adapter}}
    heads.save(out / "heads")
    return merged, merged_dir, adapter


def print_result(summary: dict, out: Path, num_eval: int) -> None:
    skipped, held_out, quality, merged_dir = summary["nonfinite_steps_skipped"], summary["held_out"], summary["base_quality"], summary["merged_model"]
    if skipped:
        print(f"warning: {skipped} of {summary['steps']} steps were skipped for a NaN/inf loss or gradient", file=sys.stderr)
    if held_out is not None:
        print(f"held-out head accuracy on the trained base ({num_eval} conversations): {format_held_out(held_out)}")
    if quality is not None:
        print(
            f"base quality on {quality['num_tokens']} held-out tokens: perplexity {quality['perplexity_before']:.4f} -> "
            f"{quality['perplexity_after']:.4f} ({100 * quality['perplexity_change']:+.2f}%), "
            f"greedy next token changed at {100 * quality['greedy_changed_fraction']:.2f}% of positions"
        )
    else:
        print("base quality: no held-out conversations (set --eval-fraction or --quality-data); not measured")
    if merged_dir is not None:
        print(f"heads saved to {out / 'heads'}; decode with --model {merged_dir} --heads {out / 'heads'}")
    else:
        print(f"heads saved to {out / 'heads'}, LoRA adapters to {out / 'adapter'}; the heads belong to the merged "
              "model, so pass --merge to get a folder that decoding loads")
