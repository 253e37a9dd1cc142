"""`medusaforge train`: the training loop, written out top to bottom.

Medusa-1: the base model is frozen (eval mode, no grad); each step runs it once to get the final
hidden states, then trains the heads on them. The loop is deliberately plain: build everything,
then `for step in range(...)`: forward, loss, backward, clip, step, log, save.

Under `torchrun` the same loop runs on every rank (see distributed.py): each rank takes its slice
of every global micro-batch, DDP sums the heads' gradients, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from medusaforge.training.sources import OfflineBatches, OnlineBatches
from medusaforge.training.checkpoint import atomic_write_text, load_checkpoint, truncate_metrics
from medusaforge.config import config_to_dict, dtype_option, option
from medusaforge.data.conversations import load_tokenized
from medusaforge.training.distributed import (
    DistributedContext,
    HeadsWithLoss,
    all_reduce_sum,
    barrier,
    init_distributed,
    main_process_first,
    placeholder_slice,
    shard_frozen_base,
    shutdown_distributed,
    wrap_heads_for_ddp,
)
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.importer import import_heads
from medusaforge.commands.cache import HiddenCache, read_lm_head_weight
from medusaforge.training.loss import default_head_weights, medusa_head_losses
from medusaforge.models import DEFAULT_MODEL, base_fingerprint, lm_head_of, load_base_model, load_tokenizer, model_name, resolve_device
from medusaforge.training.common import (
    autocast_for,
    batch_schedule,
    cosine_with_warmup,
    evaluate_heads,
    find_resume_checkpoint,
    format_held_out,
    refuse_to_overwrite,
    schedule_fingerprint,
    split_examples,
    write_checkpoint,
)
from medusaforge.drafters.vocab import most_frequent_tokens, target_token_counts


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
    batch_size: int = option(8, "conversations per micro-batch, over all ranks (each torchrun rank takes its share)")
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
    dtype: str = dtype_option("auto", "compute dtype: auto (bf16 autocast where the device runs bf16 natively, else fp32), fp32 or bf16 (no fp16: training has no loss scaling)", choices=("auto", "fp32", "bf16"))
    save_every: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    keep_last: int = option(2, "keep this many checkpoints")
    log_every: int = option(1, "write metrics every N steps")
    skip_invalid: bool = option(False, "skip bad records (counted and reported) instead of stopping")
    init_heads: Path | None = option(None, "start from these heads instead of copies of the base lm_head")
    shared_lm_head: bool = option(False, "every head reuses the frozen base lm_head; only the ResBlocks train")
    cache: Path | None = option(None, "train offline from a `medusaforge cache` folder: the base model is never run (--model must be the one that made it)")
    head_vocab: int | None = option(None, "heads project to the N most frequent target tokens of the training split (vLLM truncated_vocab_size); off by default")
    overwrite: bool = option(False, "allow writing into a non-empty --out")
    resume: str | None = option(None, "resume from a checkpoint folder, or 'auto' for the newest in --out")
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder (off by default)")
    progress: bool = option(True, "show a progress bar")
    skip_nonfinite: bool = option(False, "skip optimizer steps whose loss or gradient is NaN/inf (counted, reported) instead of stopping")
    fsdp_base: bool = option(False, "under torchrun, shard the frozen base across ranks with FSDP2 (for bases too big for one device)")
    # ---- Medusa-2 (medusa2.py): the base trains with the heads ----
    mode: str = option("medusa1", "medusa1: frozen base, heads only; medusa2: base (LoRA or full) and heads jointly", choices=["medusa1", "medusa2"])
    base_train: str = option("lora", "medusa2: train the base through LoRA adapters or fully (full keeps a teacher copy in memory)", choices=["lora", "full"])
    base_loss: str = option("distill", "medusa2: L_base = KL from the original model (distill) or cross entropy on the data (ce)", choices=["distill", "ce"])
    base_weight: float = option(1.0, "medusa2: weight of L_base")
    heads_weight: float = option(0.2, "medusa2: peak weight of the summed head losses")
    heads_weight_schedule: str = option("sine", "medusa2: heads-weight warm-up (constant, linear, sine)", choices=["constant", "linear", "sine"])
    heads_weight_warmup_ratio: float = option(0.5, "medusa2: fraction of steps over which the heads weight warms up")
    heads_lr_multiplier: float = option(4.0, "medusa2: heads lr = --lr * this (--lr is the base's lr)")
    lora_rank: int = option(16, "medusa2: LoRA rank")
    lora_alpha: float = option(32.0, "medusa2: LoRA alpha (scale alpha / rank)")
    lora_dropout: float = option(0.05, "medusa2: LoRA dropout")
    lora_target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "medusa2: module names that get LoRA adapters")
    merge: bool = option(False, "medusa2: also save the base with adapters merged into OUT/merged (loadable with --model)")
    quality_data: Path | None = option(None, "medusa2: held-out chat JSONL for the base-quality guard (default: the held-out split)")

    def validate(self) -> None:
        if self.data is None and self.cache is None:
            raise ValueError("--data (or --cache) is required")
        if self.num_heads < 1 or self.num_layers < 0:
            raise ValueError("--num-heads must be >= 1 and --num-layers >= 0")
        if self.head_weights is not None and len(self.head_weights) != self.num_heads:
            raise ValueError(f"--head-weights has {len(self.head_weights)} values for {self.num_heads} heads")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError("--eval-fraction must be in [0, 1)")
        if self.batch_size < 1 or self.grad_accum < 1 or self.chunk_size < 1:
            raise ValueError("--batch-size, --grad-accum and --chunk-size must be >= 1")
        if self.mode == "medusa2":
            from medusaforge.training.medusa2 import validate_medusa2_options

            validate_medusa2_options(self)


def run(config: TrainConfig) -> dict:
    if config.mode == "medusa2":
        from medusaforge.training.medusa2 import run_medusa2  # its own recipe, top to bottom

        return run_medusa2(config)
    context = init_distributed(resolve_device(config.device))
    try:
        return train(config, context)
    finally:
        shutdown_distributed(context)


def train(config: TrainConfig, context: DistributedContext) -> dict:
    torch.manual_seed(config.seed)
    device = context.device
    out = Path(config.out)
    # Every rank checks before any rank writes, so all of them see the same folder and agree.
    refuse_to_overwrite(out, config.overwrite, config.resume)
    barrier(context)
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
    autocast = autocast_for(device, config.dtype)

    def log(message: str) -> None:
        if context.is_main:
            print(message, file=sys.stderr)

    # ---- base model (frozen) and data ----
    # Rank 0 first: it converts a built-in model and tokenizes into the shared cache; the others reuse both.
    if config.cache is None:
        with main_process_first(context):
            tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
            base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
            base.requires_grad_(False)
            data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=log)
        source = OnlineBatches(base, data, tokenizer.pad_token_id)
        lm_head_weight, base_name, fingerprint = lm_head_of(base).weight, model_name(base), base_fingerprint(base)
    else:
        # Offline: hidden states, ids and masks come from the cache; of the base, only lm_head is read.
        cache = HiddenCache(config.cache)
        cache.check_model(config.model)
        base, data, source = None, cache.data, OfflineBatches(cache)
        lm_head_weight = read_lm_head_weight(config.model).to(device)
        base_name, fingerprint = cache.identity["model"], cache.identity["base_fingerprint"]
        log(f"offline: hidden states from {config.cache} (max_length {cache.identity['max_length']}); the base model is not run")
    train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
    log(
        f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens, {data.num_invalid} invalid records skipped"
    )

    # ---- heads, optimizer, schedule ----
    head_vocab_coverage = None
    if config.init_heads is not None:
        heads = import_heads(config.init_heads, base=base)
        if heads.config.shared_lm_head:
            heads.init_from_base(lm_head_weight)
        if heads.num_heads != config.num_heads:
            log(f"init heads: using {heads.num_heads} heads from {config.init_heads}")
    else:
        heads = MedusaHeads(
            lm_head_weight.shape[1],
            lm_head_weight.shape[0],
            config.num_heads,
            config.num_layers,
            shared_lm_head=config.shared_lm_head,
            head_vocab_size=config.head_vocab,
        )
        if config.head_vocab is not None and heads.token_map is not None:
            # Only the training split decides the kept tokens, so held-out figures stay honest.
            train_ids = torch.cat([data.example(i)[0] for i in train_indices])
            train_mask = torch.cat([data.example(i)[1] for i in train_indices])
            token_map, head_vocab_coverage = most_frequent_tokens(target_token_counts(train_ids, train_mask, lm_head_weight.shape[0]), config.head_vocab)
            heads.token_map.copy_(token_map)
            log(f"head vocabulary: {config.head_vocab} of {lm_head_weight.shape[0]} tokens cover {head_vocab_coverage:.1%} of training target tokens")
        heads.init_from_base(lm_head_weight)
    heads.config.base_model = base_name
    heads.config.base_fingerprint = fingerprint
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

    schedule = schedule_fingerprint(config, len(train_indices), total_steps)

    start_step = 0
    skipped_steps = 0  # optimizer steps skipped for a NaN/inf loss or gradient (--skip-nonfinite)
    if config.resume:
        candidates = find_resume_checkpoint(out, config.resume)
        if not candidates:
            log(f"resume auto: no complete checkpoint in {out / 'checkpoints'}; starting from step 0")
        for checkpoint in candidates:
            try:
                # The optimizer state maps onto parameters by position, so it can be loaded before the
                # checkpoint's weights are copied into our (already registered) head parameters.
                resumed, state = load_checkpoint(checkpoint, optimizer, scheduler, base=base, rank=context.rank)
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
            start_step = state["step"]
            skipped_steps = int(state["extra"].get("skipped_nonfinite", 0))
            log(f"resumed from {checkpoint} at step {start_step}")
            break

    # Frozen-base sharding comes after everything that reads the full base weights (lm_head copy,
    # fingerprints in load_heads/load_checkpoint).
    if config.fsdp_base and base is not None:  # offline runs have no base to shard
        shard_frozen_base(base, context)
    heads_with_loss = wrap_heads_for_ddp(HeadsWithLoss(heads, medusa_head_losses, config.chunk_size), context)

    metrics_path = out / "metrics.jsonl"
    metrics_file = None
    if context.is_main:
        (out / "train_config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        if config.resume:
            # Lines after the resumed step came from the crashed run; they are re-run and re-logged.
            truncate_metrics(metrics_path, start_step)
        metrics_file = open(metrics_path, "a" if config.resume else "w")
    progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                    disable=not (config.progress and context.is_main), desc="train")
    heads.train()
    started = time.perf_counter()
    tokens_seen = 0

    # ---- the loop ----
    for step in progress:
        # This rank's slice of each global micro-batch of the step (all of it in a world of one).
        batches = []
        for j in range(config.grad_accum):
            indices, placeholder = placeholder_slice(micro_batches[step * config.grad_accum + j], context.rank, context.world_size)
            batch = source.collate(indices)
            if placeholder:
                batch["loss_mask"].zero_()
            batches.append(batch)
        # Normalise by the target-token count of the whole optimizer step over all ranks, so
        # accumulation and data parallelism both give exactly the loss of one big batch.
        step_counts = torch.zeros(num_heads)
        for batch in batches:
            for k in range(num_heads):
                step_counts[k] += (batch["loss_mask"][:, k + 2 :]).sum()
        step_counts = all_reduce_sum(step_counts, context).clamp(min=1)

        loss_value = torch.zeros((), dtype=torch.float64)
        head_loss = torch.zeros(num_heads)
        head_top1 = torch.zeros(num_heads)
        head_top5 = torch.zeros(num_heads)
        for j, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            # DDP all-reduces gradients during backward; only the step's last micro-batch needs it.
            last = j == len(batches) - 1
            with nullcontext() if last or not context.enabled else heads_with_loss.no_sync():
                with autocast:
                    hidden = source.hidden_states(batch)  # base forward (online) or the cache (offline)
                    result = heads_with_loss(hidden, batch["input_ids"], batch["loss_mask"])
                    loss = sum(head_weights[k] * result.loss_sums[k] / step_counts[k] for k in range(num_heads))
                # This rank's loss is its share of the global loss and DDP averages gradients over
                # ranks, so scale by world_size to get the gradient of the global sum.
                (loss * context.world_size).backward()
            loss_value += loss.detach().double().cpu()  # a host-device sync; once per micro-batch is fine
            head_loss += torch.stack([s.detach().float().cpu() for s in result.loss_sums]) / step_counts
            head_top1 += result.top1.cpu() / step_counts
            head_top5 += result.top5.cpu() / step_counts
            tokens_seen += int(batch["attention_mask"].sum())
        # Shares of global means summed over ranks are the global means (one all-reduce per step).
        step_stats = all_reduce_sum(torch.cat([loss_value.view(1), head_loss.double(), head_top1.double(), head_top5.double()]), context)
        loss_value = float(step_stats[0])
        head_loss, head_top1, head_top5 = step_stats[1:].float().view(3, num_heads)

        # After DDP's all-reduce every rank has the same gradients, norm and loss, so all take the same branch.
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip if config.grad_clip > 0 else float("inf"))
        finite = math.isfinite(loss_value) and math.isfinite(float(grad_norm))
        if not finite and not config.skip_nonfinite:
            raise RuntimeError(
                f"step {step + 1}: loss {loss_value}, gradient norm {float(grad_norm)}: not finite; stopped before "
                f"the heads were updated. The checkpoints in {out / 'checkpoints'} are intact; resume from them, "
                "lower --lr, or pass --skip-nonfinite to skip such steps"
            )
        if finite:
            optimizer.step()
        else:
            skipped_steps += 1
            log(f"step {step + 1}: loss {loss_value}, gradient norm {float(grad_norm)}: not finite, step skipped ({skipped_steps} so far)")
        scheduler.step()  # the schedule follows the step number (= data position) even over skipped steps
        optimizer.zero_grad(set_to_none=True)

        progress.set_postfix(loss=f"{loss_value:.3f}", acc0=f"{head_top1[0]:.3f}")
        if context.is_main and ((step + 1) % config.log_every == 0 or step + 1 == total_steps):
            record = {
                "step": step + 1,
                "loss": loss_value,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "head_loss": head_loss.tolist(),
                "head_top1": head_top1.tolist(),
                "head_top5": head_top5.tolist(),
                "skipped": not finite,
                "tokens_per_s": tokens_seen * context.world_size / (time.perf_counter() - started),
            }
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        extra = {"data_position": (step + 1) * config.grad_accum, "world_size": context.world_size,
                 "schedule": schedule, "skipped_nonfinite": skipped_steps}
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
            write_checkpoint(out, step + 1, heads, optimizer, scheduler, extra, config.keep_last, context)
    if metrics_file is not None:
        metrics_file.close()
    elapsed = time.perf_counter() - started

    # ---- save and evaluate ----
    extra = {"data_position": total_steps * config.grad_accum, "world_size": context.world_size,
             "schedule": schedule, "skipped_nonfinite": skipped_steps}
    write_checkpoint(out, total_steps, heads, optimizer, scheduler, extra, config.keep_last, context)
    if context.is_main:
        heads.save(out / "heads")
    heads.eval()
    held_out = (
        evaluate_heads(heads, base, data, eval_indices, config.batch_size, 0, device, autocast, config.chunk_size, context, source)
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
        "hidden_states": str(config.cache) if config.cache else "online",
        "head_vocab_coverage": head_vocab_coverage,
        "nonfinite_steps_skipped": skipped_steps,
        "world_size": context.world_size,
        "held_out": held_out,
    }
    if not context.is_main:
        return summary
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if skipped_steps:
        print(f"warning: {skipped_steps} of {total_steps} steps were skipped for a NaN/inf loss or gradient", file=sys.stderr)
    if held_out is not None:
        print(f"held-out accuracy ({len(eval_indices)} conversations): {format_held_out(held_out)}")
    print(f"heads saved to {out / 'heads'}")
    return summary
