"""Medusa-1 recipe (`medusaforge train`, `--mode medusa1`): the training loop, written out top to bottom.

The base model is frozen (eval mode, no grad); each step runs it once to get the final hidden
states (or reads them from a `medusaforge cache` folder), then trains the heads on them. Setup is
in setup.py and sources.py; here: build everything, then `for step in range(...)`: forward, loss,
backward, clip, step, log, save.

Under `torchrun` the same loop runs on every rank (see distributed.py): each rank takes its slice
of every global micro-batch, DDP sums the heads' gradients, and only rank 0 writes files.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from medusaforge.config import option
from medusaforge.files import atomic_write_text
from medusaforge.models import resolve_device
from medusaforge.training.common import autocast_for, evaluate_heads, format_held_out, rank_batch, schedule_fingerprint, split_examples, write_checkpoint
from medusaforge.training.distributed import (
    DistributedContext, HeadsWithLoss, all_reduce_sum, init_distributed, shard_frozen_base, shutdown_distributed,
    wrap_heads_for_ddp,
)
from medusaforge.training.budget import settle_budget
from medusaforge.training.loss import SoftTargets, default_head_weights, medusa_head_losses
from medusaforge.training.options import BaseModelOptions, BudgetOptions, DataOptions, HeadOptions, OptimOptions, OutputOptions
from medusaforge.training.setup import (
    build_heads, held_out_point, make_logger, open_metrics, optimizer_and_schedule, optimizer_step, peak_rss_bytes, plan_and_budget, prepare_output,
    resume, training_target_counts,
)
from medusaforge.training.sources import held_out_source, open_source


@dataclass
class Medusa1Config(OutputOptions, BudgetOptions, OptimOptions, HeadOptions, DataOptions, BaseModelOptions):
    """Train Medusa heads on a frozen base (Medusa-1) from a chat JSONL file (ShareGPT or OpenAI messages)."""

    cache: Path | None = option(None, "train offline from a `medusaforge cache` folder: the base model is never run (--model must be the one that made it)")
    head_vocab: int | None = option(None, "heads project to the N most frequent target tokens of the training split (vLLM truncated_vocab_size); off by default")
    fsdp_base: bool = option(False, "under torchrun, shard the frozen base across ranks with FSDP2 (for bases too big for one device)")
    held_out_cache: Path | None = option(None, "a second `medusaforge cache` folder whose conversations are all held out, in place of --eval-fraction of the training data: recipes trained on different data are then compared on the same text")
    soft_targets: float = option(0.0, "share of each head's loss taken against the base's own distribution of the target token, softmax(lm_head h_{t+k+1}), instead of the token itself: 0 tokens only, 1 the distribution only, between both (computed from the hidden states, no extra base pass)")

    def validate(self) -> None:
        if self.data is None and self.cache is None:
            raise ValueError("--data (or --cache) is required")
        self.check_data()
        self.check_heads()
        self.check_optim()
        self.check_output()
        self.check_budget(self.max_length)
        if not 0.0 <= self.soft_targets <= 1.0:
            raise ValueError(f"--soft-targets must be in [0, 1], got {self.soft_targets}")


def train(config: Medusa1Config) -> dict:
    context = init_distributed(resolve_device(config.device))
    try:
        return train_on(config, context)
    finally:
        shutdown_distributed(context)


def train_on(config: Medusa1Config, context: DistributedContext) -> dict:
    torch.manual_seed(config.seed)
    device, log = context.device, make_logger(context)
    out = prepare_output(config, context)
    autocast = autocast_for(device, config.dtype)

    # ---- hidden states, data, heads, optimizer, schedule, resume ----
    setup = open_source(config, context, log)
    source, data = setup.source, setup.data
    if config.held_out_cache is not None:
        train_indices = list(range(len(data)))
        eval_source, eval_indices = held_out_source(config.held_out_cache, config.model, log)
    else:
        train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
        eval_source = source
    log(f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens, {data.num_invalid} invalid records skipped")
    counts = training_target_counts(data, train_indices, setup.lm_head_weight.shape[0]) if config.head_vocab else None
    heads, head_vocab_coverage = build_heads(config, setup.lm_head_weight, setup.base, log, counts)
    heads.config.base_model, heads.config.base_fingerprint = setup.base_name, setup.base_fingerprint
    heads.to(device)
    num_heads = heads.num_heads
    head_weights = config.head_weights or default_head_weights(num_heads, config.head_weight_decay)
    micro_batches, budget = plan_and_budget(config, data.lengths.tolist(), train_indices)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule([{"params": trainable, "lr": config.lr}], config, budget.total, budget)
    schedule = schedule_fingerprint(config, len(train_indices), budget.planned_steps)
    start_step, skipped_steps = resume(config, out, heads, optimizer, scheduler, schedule, log, context.rank, base=setup.base, budget=budget)

    # Frozen-base sharding comes after everything that reads the full base weights (lm_head copy,
    # fingerprints in build_heads/resume). Offline runs have no base to shard.
    if config.fsdp_base and setup.base is not None:
        shard_frozen_base(setup.base, context)
    # Soft targets read the frozen base lm_head (not a parameter of the heads, so DDP ignores it).
    soft = SoftTargets(setup.lm_head_weight, config.soft_targets) if config.soft_targets > 0 else None
    loss_fn = partial(medusa_head_losses, soft=soft) if soft is not None else medusa_head_losses
    heads_with_loss = wrap_heads_for_ddp(HeadsWithLoss(heads, loss_fn, config.chunk_size), context)
    metrics_file = open_metrics(out, config, start_step, "medusa1") if context.is_main else None
    progress = tqdm(initial=start_step, total=budget.total, disable=not (config.progress and context.is_main), desc="train")
    heads.train()
    started, tokens_seen = time.perf_counter(), 0

    # ---- the loop: until the step budget, which --max-minutes may shrink as it goes ----
    step = start_step
    while step < budget.total:
        step_started = time.perf_counter()
        # This rank's slice of each global micro-batch of the step (all of it in a world of one).
        batches = [rank_batch(source, micro_batches[step * config.grad_accum + j], context) for j in range(config.grad_accum)]
        # Normalise by the target-token count of the whole optimizer step over all ranks, so
        # accumulation and data parallelism both give exactly the loss of one big batch.
        step_counts = torch.zeros(num_heads)
        for batch in batches:
            for k in range(num_heads):
                step_counts[k] += (batch["loss_mask"][:, k + 2 :]).sum()
        step_counts = all_reduce_sum(step_counts, context).clamp(min=1)

        loss_value = torch.zeros((), dtype=torch.float64)
        # Sums over the step's micro-batches: token loss, its predictable targets, soft loss, hits.
        sums = torch.zeros(5, num_heads, dtype=torch.float64)
        for j, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            # DDP all-reduces gradients during backward; only the step's last micro-batch needs it.
            last = j == len(batches) - 1
            with nullcontext() if last or not context.enabled else heads_with_loss.no_sync():
                if soft is not None:
                    soft.log_normaliser = batch.get("log_normaliser")  # from the cache, else computed per micro-batch
                with autocast:
                    hidden = source.hidden_states(batch)  # base forward (online) or the cache (offline)
                    result = heads_with_loss(hidden, batch["input_ids"], batch["loss_mask"])
                    loss = sum(head_weights[k] * result.loss_sums[k] / step_counts[k] for k in range(num_heads))
                # This rank's loss is its share of the global loss and DDP averages gradients over
                # ranks, so scale by world_size to get the gradient of the global sum.
                (loss * context.world_size).backward()
            loss_value += loss.detach().double().cpu()  # a host-device sync; once per micro-batch is fine
            sums += torch.stack([result.token_loss_sums, result.predictable, result.soft_loss_sums, result.top1, result.top5]).double().cpu()
            tokens_seen += int(batch["attention_mask"].sum())
        # One all-reduce per step: the loss (each rank's share of the global mean) and the global sums.
        step_stats = all_reduce_sum(torch.cat([loss_value.view(1), sums.flatten()]), context)
        loss_value = float(step_stats[0])
        token_loss, predictable, soft_loss, hits1, hits5 = step_stats[1:].view(5, num_heads)
        # The token loss is reported over the targets a (truncated) head vocabulary can predict,
        # with the share it cannot predict beside it; accuracy counts those as misses.
        head_loss = (token_loss / predictable.clamp(min=1)).float()
        head_outside = (1 - predictable / step_counts).float()
        head_top1, head_top5 = (hits1 / step_counts).float(), (hits5 / step_counts).float()

        # --max-minutes: the total shrinks to the steps that fit, and this step's LR follows it.
        if settle_budget(budget, step + 1, step_started, started, optimizer, scheduler, context):
            progress.total = budget.total

        # After DDP's all-reduce every rank has the same gradients, norm and loss, so all take the same branch.
        grad_norm, finite = optimizer_step(optimizer, scheduler, trainable, config, step, loss_value, out)
        if not finite:
            skipped_steps += 1
            log(f"step {step + 1}: loss {loss_value}, gradient norm {grad_norm}: not finite, step skipped ({skipped_steps} so far)")

        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}", acc0=f"{head_top1[0]:.3f}")
        if context.is_main and ((step + 1) % config.log_every == 0 or step + 1 == budget.total):
            record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "head_loss": head_loss.tolist(), "head_outside": head_outside.tolist(), "head_top1": head_top1.tolist(),
                      "head_top5": head_top5.tolist(), "skipped": not finite,
                      "tokens_per_s": tokens_seen * context.world_size / (time.perf_counter() - started),
                      "seconds": round(time.perf_counter() - started, 1)}
            if config.soft_targets > 0:
                record["head_soft_loss"] = (soft_loss / step_counts).float().tolist()
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        step += 1
        if config.eval_every and step % config.eval_every == 0 and step < budget.total and eval_indices:
            evaluate = partial(evaluate_heads,
                               heads, eval_source, eval_indices, config.batch_size, device, autocast, config.chunk_size, context)
            started = held_out_point(heads, evaluate, metrics_file, step, started)
        extra = {"data_position": step * config.grad_accum, "world_size": context.world_size, "schedule": schedule,
                 "skipped_nonfinite": skipped_steps, "budget": budget.state(time.perf_counter() - started)}
        if config.save_every and step % config.save_every == 0 and step < budget.total:
            write_checkpoint(out, step, heads, optimizer, scheduler, extra, config.keep_last, context)
    progress.close()
    if metrics_file is not None:
        metrics_file.close()
    elapsed = time.perf_counter() - started
    total_steps = budget.total

    # ---- save and evaluate ----
    extra = {"data_position": total_steps * config.grad_accum, "world_size": context.world_size, "schedule": schedule,
             "skipped_nonfinite": skipped_steps, "budget": budget.state(elapsed)}
    write_checkpoint(out, total_steps, heads, optimizer, scheduler, extra, config.keep_last, context)
    if context.is_main:
        heads.save(out / "heads")
    heads.eval()
    held_out = evaluate_heads(heads, eval_source, eval_indices, config.batch_size, device, autocast, config.chunk_size, context) if eval_indices else None
    summary = {
        "model": heads.config.base_model, "data": str(config.data), "num_heads": num_heads, "num_layers": heads.config.num_layers,
        "steps": total_steps, "train_conversations": len(train_indices), "eval_conversations": len(eval_indices),
        "train_seconds": round(elapsed, 1), "invalid_records_skipped": data.num_invalid,
        "hidden_states": str(config.cache) if config.cache else "online", "head_vocab_coverage": head_vocab_coverage,
        "nonfinite_steps_skipped": skipped_steps, "world_size": context.world_size, "held_out": held_out,
        "planned_steps": budget.planned_steps, "max_minutes": config.max_minutes, "batch_tokens": config.batch_tokens,
        "soft_targets": config.soft_targets, "held_out_cache": str(config.held_out_cache) if config.held_out_cache else None,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if not context.is_main:
        return summary
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if skipped_steps:
        print(f"warning: {skipped_steps} of {total_steps} steps were skipped for a NaN/inf loss or gradient", file=sys.stderr)
    if held_out is not None:
        print(f"held-out accuracy ({len(eval_indices)} conversations): {format_held_out(held_out)}")
    print(f"heads saved to {out / 'heads'}; {total_steps} steps in {elapsed:.0f} s, peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    return summary
