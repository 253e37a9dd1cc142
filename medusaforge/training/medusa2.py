"""`medusaforge train --mode medusa2`: train the base model jointly with the heads, written out.

Medusa-2 lets the heads' loss reach into the base model, so the base learns hidden states its heads
can read, while a base loss keeps the base what it was:
    loss = base_weight * L_base + heads_weight(step) * sum_k decay**k * L_k
L_base is either cross entropy on the data or (default) self-distillation, the KL divergence from
the original model's next-token distribution. With LoRA the teacher is the same model with its
adapters switched off (peft's `disable_adapter()`), so no second copy is held; full fine-tuning
keeps a frozen copy of the original model as the teacher (twice the base's weights in memory).

The two-stage recipe: stage 1 trains the heads alone (`--mode medusa1`), stage 2 starts from them
(`--mode medusa2 --init-heads STAGE1/heads`).

Outputs in --out: adapter/ (LoRA, peft format), merged/ (with --merge, or always with
--base-train full: an HF model folder with the tokenizer, loadable with --model), heads/ (their
config's base_fingerprint is the merged model's, so decoding refuses them on the original base),
metrics.jsonl, summary.json (with the base-quality guard: held-out perplexity before and after,
and the share of held-out greedy next tokens that changed).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from medusaforge.training.checkpoint import atomic_write_text
from medusaforge.config import config_to_dict
from medusaforge.data.conversations import collate, load_tokenized
from medusaforge.drafters.medusa_heads import MedusaHeads, replace_directory
from medusaforge.interop.importer import import_heads
from medusaforge.training.loss import IGNORE_INDEX, base_targets, default_head_weights, linear_cross_entropy, medusa_head_losses
from medusaforge.training.medusa2_loss import HEADS_WEIGHT_SCHEDULES, heads_weight_at, linear_kl_divergence
from medusaforge.models import base_fingerprint, final_hidden_states, lm_head_of, load_base_model, load_tokenizer, model_name, resolve_device
from medusaforge.training.common import (
    autocast_for,
    batch_schedule,
    cosine_with_warmup,
    evaluate_heads,
    format_held_out,
    prepare_output_dir,
    split_examples,
)

def validate_medusa2_options(config) -> None:
    """Checks for the Medusa-2 fields of TrainConfig (YAML values bypass argparse's choices)."""
    if config.base_train not in ("lora", "full"):
        raise ValueError(f"--base-train must be lora or full, got {config.base_train!r}")
    if config.base_loss not in ("distill", "ce"):
        raise ValueError(f"--base-loss must be distill or ce, got {config.base_loss!r}")
    if config.heads_weight_schedule not in HEADS_WEIGHT_SCHEDULES:
        raise ValueError(f"--heads-weight-schedule must be one of {HEADS_WEIGHT_SCHEDULES}")
    if not 0.0 <= config.heads_weight_warmup_ratio <= 1.0:
        raise ValueError("--heads-weight-warmup-ratio must be in [0, 1]")
    if config.heads_lr_multiplier <= 0 or config.base_weight < 0 or config.heads_weight < 0:
        raise ValueError("--heads-lr-multiplier must be > 0; --base-weight and --heads-weight must be >= 0")
    if config.lora_rank < 1:
        raise ValueError("--lora-rank must be >= 1")
    if {"lm_head", "embed_tokens"} & set(config.lora_target_modules):
        # The losses read lm_head's weight directly (a plain nn.Linear); a LoRA-wrapped one has none.
        raise ValueError("--lora-target-modules: lm_head and embed_tokens cannot take adapters here")
    if config.resume:
        raise ValueError("--resume is not supported with --mode medusa2 yet; rerun stage 2 from the stage-1 heads")
    if getattr(config, "cache", None):
        raise ValueError("--cache cannot be used with --mode medusa2: the base model changes, so cached hidden states go stale")
    if getattr(config, "head_vocab", None) is not None:
        raise ValueError("--head-vocab is not supported with --mode medusa2 yet (train truncated heads in stage 1 instead)")
    if getattr(config, "fsdp_base", False):
        raise ValueError("--fsdp-base shards a frozen base; --mode medusa2 trains the base on one device")


# ---- the base model as student and teacher ---------------------------------------------------


def make_lora_student(base, config):
    """Wrap `base` in LoRA adapters in place; -> the peft model. Only adapter weights train.

    peft injects the adapter layers into `base`'s own modules, so `base(...)` and
    `final_hidden_states(base, ...)` run with the adapters from here on.
    """
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
    )
    return get_peft_model(base, lora_config)


def make_teacher(base, peft_model, base_train: str):
    """-> teacher(input_ids, attention_mask) -> (hidden [B, T, H], lm_head weight [V, H]) of the
    original model, with no gradient.

    LoRA: the student itself with adapters disabled; that is bit for bit the original model.
    Full fine-tuning: the base's weights change in place, so a frozen copy is taken now.
    """
    if base_train == "lora":

        @torch.no_grad()
        def teacher(input_ids, attention_mask):
            with peft_model.disable_adapter():
                return final_hidden_states(base, input_ids, attention_mask), lm_head_of(base).weight

        return teacher
    frozen = copy.deepcopy(base).eval().requires_grad_(False)

    @torch.no_grad()
    def teacher(input_ids, attention_mask):
        return final_hidden_states(frozen, input_ids, attention_mask), lm_head_of(frozen).weight

    return teacher


def base_loss_sum(base, hidden, input_ids, loss_mask, attention_mask, kind: str, teacher, chunk_size: int):
    """Summed L_base over the target (assistant) next-token positions of one micro-batch.

    hidden: [B, T, H] student hidden states. Only positions whose t+1 label counts are projected to
    the vocabulary, one chunk at a time. kind: "ce" (cross entropy on the data) or "distill"
    (KL(original || student) of the next-token distributions).
    """
    labels = base_targets(input_ids, loss_mask)
    selected = labels != IGNORE_INDEX
    weight = lm_head_of(base).weight
    if kind == "ce":
        loss_sum, _, _ = linear_cross_entropy(hidden[selected], weight, labels[selected], chunk_size)
        return loss_sum
    teacher_hidden, teacher_weight = teacher(input_ids, attention_mask)
    return linear_kl_divergence(hidden[selected], weight, teacher_hidden[selected], teacher_weight, chunk_size)


# ---- the quality guard -----------------------------------------------------------------------


@torch.no_grad()
def base_quality(base, data, indices, batch_size, pad_token_id, device, autocast, chunk_size) -> dict:
    """Held-out next-token NLL sum, token count and greedy next tokens [N] over assistant targets."""
    weight = lm_head_of(base).weight
    nll_sum, count, greedy = 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        batch = collate([data.example(i) for i in indices[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = base_targets(batch["input_ids"], batch["loss_mask"])
        selected = labels != IGNORE_INDEX
        with autocast:
            hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])[selected]
        targets = labels[selected]
        for chunk in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[chunk : chunk + chunk_size].float() @ weight.float().T)  # [chunk, vocab]
            nll_sum += float(torch.nn.functional.cross_entropy(logits, targets[chunk : chunk + chunk_size], reduction="sum"))
            greedy.append(logits.argmax(-1).cpu())
        count += int(selected.sum())
    return {"nll_sum": nll_sum, "num_tokens": count, "greedy": torch.cat(greedy) if greedy else torch.zeros(0, dtype=torch.long)}


def quality_report(before: dict, after: dict) -> dict:
    """Perplexities before/after and the share of positions whose greedy next token changed."""
    tokens = max(before["num_tokens"], 1)
    perplexity_before = math.exp(before["nll_sum"] / tokens)
    perplexity_after = math.exp(after["nll_sum"] / tokens)
    changed = (before["greedy"] != after["greedy"]).float().mean().item() if before["num_tokens"] else 0.0
    return {
        "num_tokens": before["num_tokens"],
        "perplexity_before": perplexity_before,
        "perplexity_after": perplexity_after,
        "perplexity_change": perplexity_after / perplexity_before - 1.0,
        "greedy_changed_fraction": changed,
    }


def save_merged(model, tokenizer, directory: Path) -> None:
    """An HF model folder (weights + tokenizer) that `--model DIRECTORY` loads; written atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        replace_directory(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- the recipe ------------------------------------------------------------------------------


def run_medusa2(config) -> dict:
    validate_medusa2_options(config)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    out = Path(config.out)
    prepare_output_dir(out, config.overwrite, config.resume)
    autocast = autocast_for(device, config.dtype)

    # ---- base model (fp32 weights, trained under autocast) and data ----
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
    base.requires_grad_(False)
    original_name = model_name(base)
    data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid)
    train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
    if config.quality_data is not None:
        quality_data = load_tokenized(config.quality_data, tokenizer, config.max_length, skip_invalid=config.skip_invalid)
        quality_indices = list(range(len(quality_data)))
    else:
        quality_data, quality_indices = data, eval_indices
    print(
        f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens; quality guard on {len(quality_indices)} conversations",
        file=sys.stderr,
    )
    quality_before = None
    if quality_indices:
        quality_before = base_quality(
            base, quality_data, quality_indices, config.batch_size, tokenizer.pad_token_id, device, autocast, config.chunk_size
        )

    # ---- heads: from stage 1 (checked against the original base) or fresh copies of lm_head ----
    # (the same few lines as train.run; a helper for two call sites would hide more than it saves)
    if config.init_heads is not None:
        heads = import_heads(config.init_heads, base=base)
    else:
        lm_head_weight = lm_head_of(base).weight
        heads = MedusaHeads(
            lm_head_weight.shape[1], lm_head_weight.shape[0], config.num_heads, config.num_layers, shared_lm_head=config.shared_lm_head
        )
        heads.init_from_base(lm_head_weight)
    heads.to(device)
    num_heads = heads.num_heads
    head_weights = config.head_weights or default_head_weights(num_heads, config.head_weight_decay)

    # ---- the base as student (LoRA or full) and the original as teacher ----
    peft_model = None
    if config.base_train == "lora":
        peft_model = make_lora_student(base, config)
    else:
        base.requires_grad_(True)
    teacher = make_teacher(base, peft_model, config.base_train) if config.base_loss == "distill" else None
    base_params = [p for p in base.parameters() if p.requires_grad]
    head_params = [p for p in heads.parameters() if p.requires_grad]
    print(
        f"medusa2: {config.base_train} base ({sum(p.numel() for p in base_params):,} trainable), "
        f"{sum(p.numel() for p in head_params):,} head parameters, L_base = {config.base_loss}",
        file=sys.stderr,
    )

    # ---- optimizer (two learning rates), schedule ----
    steps_per_epoch = max(1, math.ceil(len(train_indices) / config.batch_size / config.grad_accum))
    total_steps = config.max_steps or max(1, int(round(steps_per_epoch * config.epochs)))
    warmup_steps = max(1, int(total_steps * config.warmup_ratio))
    trainable = base_params + head_params
    optimizer = torch.optim.AdamW(
        [
            {"params": base_params, "lr": config.lr},
            {"params": head_params, "lr": config.lr * config.heads_lr_multiplier},
        ],
        weight_decay=config.weight_decay,
        betas=(0.9, 0.95),
    )
    # One multiplier for both groups: each keeps its own peak lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, total_steps, warmup_steps, config.min_lr_ratio)
    )
    micro_batches = batch_schedule(train_indices, config.batch_size, total_steps * config.grad_accum, config.seed)

    (out / "train_config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    metrics_file = open(out / "metrics.jsonl", "w")
    progress = tqdm(range(total_steps), total=total_steps, disable=not config.progress, desc="medusa2")
    base.train()  # LoRA dropout on; Llama-style decoders have no other dropout by default
    heads.train()
    started = time.perf_counter()
    tokens_seen = 0

    # ---- the loop ----
    for step in progress:
        heads_weight = heads_weight_at(
            step, total_steps, config.heads_weight, config.heads_weight_schedule, config.heads_weight_warmup_ratio
        )
        batches = [
            collate([data.example(i) for i in micro_batches[step * config.grad_accum + j]], tokenizer.pad_token_id)
            for j in range(config.grad_accum)
        ]
        # Normalise by the target-token counts of the whole optimizer step, as train.run does.
        head_counts = torch.zeros(num_heads)
        base_count = 0
        for batch in batches:
            for k in range(num_heads):
                head_counts[k] += batch["loss_mask"][:, k + 2 :].sum()
            base_count += int(batch["loss_mask"][:, 1:].sum())
        head_counts = head_counts.clamp(min=1)
        base_count = max(base_count, 1)

        loss_value = base_loss_value = heads_loss_value = 0.0
        head_top1 = torch.zeros(num_heads)
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast:
                # No torch.no_grad() here, unlike Medusa-1: the heads' gradient flows into the base.
                hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])
                result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], config.chunk_size)
                heads_loss = sum(head_weights[k] * result.loss_sums[k] / head_counts[k] for k in range(num_heads))
                base_loss = base_loss_sum(
                    base, hidden, batch["input_ids"], batch["loss_mask"], batch["attention_mask"],
                    config.base_loss, teacher, config.chunk_size,
                ) / base_count
                loss = config.base_weight * base_loss + heads_weight * heads_loss
            loss.backward()
            # Host-device syncs, once per micro-batch.
            loss_value += float(loss.detach())
            base_loss_value += float(base_loss.detach())
            heads_loss_value += float(heads_loss.detach())
            head_top1 += result.top1.cpu() / head_counts
            tokens_seen += int(batch["attention_mask"].sum())

        if not math.isfinite(loss_value):
            raise RuntimeError(f"step {step}: loss is {loss_value}; stopping before the model is damaged (nothing saved)")
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        progress.set_postfix(base=f"{base_loss_value:.4f}", heads=f"{heads_loss_value:.3f}", acc0=f"{head_top1[0]:.3f}")
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            record = {
                "step": step + 1,
                "loss": loss_value,
                "base_loss": base_loss_value,
                "heads_loss": heads_loss_value,
                "heads_weight": heads_weight,
                "lr_base": scheduler.get_last_lr()[0],
                "lr_heads": scheduler.get_last_lr()[1],
                "grad_norm": float(grad_norm),
                "head_top1": head_top1.tolist(),
                "tokens_per_s": tokens_seen / (time.perf_counter() - started),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
    metrics_file.close()
    elapsed = time.perf_counter() - started

    # ---- save: adapters, then the merged base, then heads stamped with the merged base's fingerprint ----
    base.eval()
    heads.eval()
    teacher = None  # frees the full-fine-tuning copy before the merged model is saved
    if peft_model is not None:
        peft_model.save_pretrained(out / "adapter")
        merged = peft_model.merge_and_unload()  # folds B @ A * alpha / r into the base weights
    else:
        merged = base
    merged.requires_grad_(False)
    merged_dir = out / "merged" if (config.merge or peft_model is None) else None
    if merged_dir is not None:
        save_merged(merged, tokenizer, merged_dir)
    heads.config.base_fingerprint = base_fingerprint(merged)
    heads.config.base_model = str(merged_dir.resolve()) if merged_dir is not None else original_name
    heads.config.extra = {
        **heads.config.extra,
        "medusa2": {"original_base": original_name, "base_train": config.base_train, "adapter": str(out / "adapter") if peft_model else None},
    }
    heads.save(out / "heads")

    # ---- evaluate: heads on the new base, and the base against its former self ----
    held_out = (
        evaluate_heads(heads, merged, data, eval_indices, config.batch_size, tokenizer.pad_token_id, device, autocast, config.chunk_size)
        if eval_indices
        else None
    )
    quality = None
    if quality_before is not None:
        quality_after = base_quality(
            merged, quality_data, quality_indices, config.batch_size, tokenizer.pad_token_id, device, autocast, config.chunk_size
        )
        quality = quality_report(quality_before, quality_after)
    summary = {
        "mode": "medusa2",
        "model": original_name,
        "merged_model": str(merged_dir) if merged_dir is not None else None,
        "adapter": str(out / "adapter") if peft_model is not None else None,
        "base_train": config.base_train,
        "base_loss": config.base_loss,
        "data": str(config.data),
        "num_heads": num_heads,
        "num_layers": heads.config.num_layers,
        "steps": total_steps,
        "train_conversations": len(train_indices),
        "eval_conversations": len(eval_indices),
        "train_seconds": round(elapsed, 1),
        "invalid_records_skipped": data.num_invalid,
        "held_out": held_out,
        "base_quality": quality,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if held_out is not None:
        print(f"held-out head accuracy on the trained base ({len(eval_indices)} conversations): {format_held_out(held_out)}")
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
        print(
            f"heads saved to {out / 'heads'}, LoRA adapters to {out / 'adapter'}; the heads belong to the merged "
            "model, so pass --merge to get a folder that decoding loads"
        )
    return summary
