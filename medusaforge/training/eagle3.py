"""EAGLE-3 recipe (`medusaforge train --method eagle3`): the training loop, written out top to bottom.

The base is frozen. Each micro-batch runs it once (output_hidden_states) for the three feature
layers and its own logits; the draft fuses the features, unrolls `num_steps` steps with
training-time test (drafters/eagle3.py, `unroll`), and every step is trained against the base's
distribution over the draft vocabulary, weighted 0.8**k (training/eagle3_loss.py).

Guarantees as the Medusa recipe: held-out conversations (prompts never trained on) are split off
by the same seeded rule; the data order is fixed up front so a resume continues exactly; checkpoints
are written atomically and never hold NaN; under torchrun every rank takes its slice of each global
micro-batch, DDP sums the draft's gradients, and only rank 0 writes files.

Output: OUT/draft/ (config.json + model.safetensors, the engines' key names), OUT/checkpoints/,
metrics.jsonl (per-step loss and top-1 for every unrolled step), summary.json (held-out top-1 per step).
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from medusaforge.config import option
from medusaforge.data.conversations import load_tokenized
from medusaforge.drafters.draft_vocab import coverage, prediction_counts, select_draft_vocab, vocab_maps
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base, load_draft
from medusaforge.files import atomic_write_text
from medusaforge.models import base_fingerprint, lm_head_of, load_base_model, load_tokenizer, model_name, resolve_device
from medusaforge.training.common import autocast_for, rank_batch, schedule_fingerprint, split_examples, write_checkpoint
from medusaforge.training.distributed import (
    DistributedContext, all_reduce_sum, init_distributed, main_process_first, shard_frozen_base, shutdown_distributed,
    wrap_heads_for_ddp,
)
from medusaforge.training.eagle3_features import Eagle3OfflineBatches, Eagle3OnlineBatches
from medusaforge.training.hidden_cache import HiddenCache
from medusaforge.training.eagle3_loss import eagle3_losses, step_positions, step_weights
from medusaforge.training.budget import settle_budget
from medusaforge.training.options import BaseModelOptions, BudgetOptions, DataOptions, OptimOptions, OutputOptions
from medusaforge.training.setup import (
    held_out_point, make_logger, open_metrics, optimizer_and_schedule, optimizer_step, peak_rss_bytes, plan_and_budget, prepare_output, resume,
    training_target_counts,
)


@dataclass
class Eagle3Config(OutputOptions, BudgetOptions, OptimOptions, DataOptions, BaseModelOptions):
    """Train an EAGLE-3 draft (one decoder layer over fused base features) on a chat JSONL file; the
    replies may be human-written, since the targets are the base model's own distributions."""

    out: Path = option(Path("runs/eagle3"), "output folder: draft/, checkpoints/, metrics.jsonl, summary.json")
    num_steps: int = option(7, "training-time-test steps unrolled per position (step k predicts token t+k+2)")
    step_weight_decay: float = option(0.8, "loss weight of step k is decay**k (EAGLE-3 paper)")
    draft_vocab: int = option(8192, "draft vocabulary: the N tokens the base predicts most often on the training split")
    vocab_examples: int = option(256, "training conversations the base is run on to count its predictions for the draft vocabulary")
    feature_layers: list[int] | None = option(None, "three HF hidden_states indices fused by the draft (default: 2, L//2, L-3 as vLLM/SpecForge)")
    init_from_base: bool = option(True, "start the draft's lm_head and final norm from the base's (rows of the draft vocabulary)")
    init_layer_from_base: bool = option(True, "also start the draft's layer as the base layer that reads the high feature (fc passes that feature through)")
    chunk_size: int = option(512, "positions per chunk in each step's loss (peak memory ~ chunk * draft_vocab * 4 bytes per step)")
    cache: Path | None = option(None, "train offline from a `medusaforge cache --eagle3-features` folder: the base is loaded (config, embedding) but never run; --model must be the one that made it")
    fsdp_base: bool = option(False, "under torchrun, shard the frozen base's decoder layers across ranks with FSDP2 (for bases too big for one device; online only)")

    def validate(self) -> None:
        if self.data is None and self.cache is None:
            raise ValueError("--data (or --cache) is required")
        if self.num_steps < 1 or self.draft_vocab < 1 or self.vocab_examples < 1:
            raise ValueError("--num-steps, --draft-vocab and --vocab-examples must be >= 1")
        if self.feature_layers is not None and len(self.feature_layers) != 3:
            raise ValueError(f"--feature-layers needs three layer indices, got {self.feature_layers}")
        if self.max_length < 3:
            raise ValueError("--max-length must be >= 3 (a draft step needs a token and a target after it)")
        if self.chunk_size < 1:
            raise ValueError("--chunk-size must be >= 1")
        self.check_data()
        self.check_optim()
        self.check_output()
        self.check_budget(self.max_length)


class DraftWithLoss(nn.Module):
    """The draft's unroll and loss as one forward call, so DDP can hook its gradient all-reduce."""

    def __init__(self, draft: Eagle3Draft, num_steps: int, chunk_size: int) -> None:
        super().__init__()
        self.draft, self.num_steps, self.chunk_size = draft, num_steps, chunk_size

    def forward(self, features, input_ids, target_logits, base_argmax, loss_mask):
        hiddens = self.draft.unroll(input_ids, self.draft.fuse(features), self.num_steps)
        return eagle3_losses(self.draft, hiddens, target_logits, base_argmax, loss_mask, self.chunk_size)


@torch.no_grad()
def start_layer_from(draft: Eagle3Draft, base_layer: nn.Module) -> None:
    """Start the draft's layer as the base decoder layer that reads the high feature (HF index j is
    the input of layer j), so at step 0 the draft begins as that layer over the high feature at i.

    fc passes the high feature through unchanged (low and mid start at zero); q/k/v read the
    hidden half with the base layer's weights and keep their random init on the embedding half,
    which is the new input the draft must learn to use. MLP, o_proj and norms are copied; a
    base layer's extra parts (attention biases, q/k norms) have no place here and are left out.
    Raises ValueError, changing nothing, when the base layer is not shaped like the draft's."""
    hidden = draft.config.hidden_size
    layer, attention = draft.midlayer, draft.midlayer.self_attn
    try:
        pairs = [(getattr(attention, name).weight[:, hidden:], getattr(base_layer.self_attn, name).weight) for name in ("q_proj", "k_proj", "v_proj")]
        pairs += [(attention.o_proj.weight, base_layer.self_attn.o_proj.weight),
                  (layer.hidden_norm.weight, base_layer.input_layernorm.weight),
                  (layer.post_attention_layernorm.weight, base_layer.post_attention_layernorm.weight)]
        base_mlp = base_layer.mlp.state_dict()
        pairs += [(tensor, base_mlp.get(name)) for name, tensor in layer.mlp.state_dict().items()]
    except AttributeError as error:
        raise ValueError(f"the base layer lacks a part of a Llama layer: {error}") from None
    for own, source in pairs:
        if source is None or own.shape != source.shape:
            raise ValueError(f"the base layer's weights do not fit the draft's layer ({None if source is None else list(source.shape)} against {list(own.shape)})")
    draft.fc.weight.zero_()
    draft.fc.weight[:, 2 * hidden :].copy_(torch.eye(hidden))
    for own, source in pairs:
        own.copy_(source)


def choose_draft_vocab(source, data, train_indices: list[int], config: Eagle3Config, vocab_size: int, device, autocast):
    """token_map [draft_vocab] from the base's greedy predictions on the first `vocab_examples`
    training conversations (only the training split decides, so held-out figures stay honest)."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    sample = train_indices[: config.vocab_examples]
    for start in range(0, len(sample), config.batch_size):
        batch = {k: v.to(device) for k, v in source.collate(sample[start : start + config.batch_size]).items()}
        with autocast:
            argmax = source.base_argmax(batch)
        counts += prediction_counts(argmax.cpu(), batch["loss_mask"].cpu(), vocab_size)
    token_map = select_draft_vocab(counts, training_target_counts(data, train_indices, vocab_size), config.draft_vocab)
    return token_map, coverage(token_map, counts)


@torch.no_grad()
def evaluate_draft(draft, source, indices: list[int], batch_size: int, num_steps: int, device, autocast, context: DistributedContext,
                   chunk_size: int = 512) -> dict:
    """Held-out per-step loss and top-1 (greedy acceptance of step k given steps < k teacher-forced)."""
    loss_total, top1, counts = torch.zeros(num_steps), torch.zeros(num_steps), torch.zeros(num_steps)
    for start in range(0, len(indices), batch_size):
        batch = {k: v.to(device) for k, v in rank_batch(source, indices[start : start + batch_size], context).items()}
        with autocast:
            features, target_logits, base_argmax = source.inputs(batch)
            hiddens = draft.unroll(batch["input_ids"], draft.fuse(features), num_steps)
            result = eagle3_losses(draft, hiddens, target_logits, base_argmax, batch["loss_mask"], chunk_size)
        loss_total += torch.stack([s.float().cpu() for s in result.loss_sums])
        top1 += result.top1
        counts += result.counts
    for total in (loss_total, top1, counts):
        all_reduce_sum(total, context)
    denominator = counts.clamp(min=1)
    return {"num_tokens": counts.tolist(), "loss": (loss_total / denominator).tolist(), "top1": (top1 / denominator).tolist()}


def train(config: Eagle3Config) -> dict:
    config.validate()
    context = init_distributed(resolve_device(config.device))
    try:
        return train_on(config, context)
    finally:
        shutdown_distributed(context)


def train_on(config: Eagle3Config, context: DistributedContext) -> dict:
    torch.manual_seed(config.seed)
    device, log = context.device, make_logger(context)
    out = prepare_output(config, context)
    autocast = autocast_for(device, config.dtype)

    # ---- base model (frozen) and data ----
    # The base is always loaded: the draft takes its config and frozen token embedding. With
    # --cache it is never run; features, ids and masks come from the cache.
    with main_process_first(context):
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
        base.requires_grad_(False)
        cache = HiddenCache(config.cache) if config.cache else None
        data = cache.data if cache else load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=log)
    lm_head_weight = lm_head_of(base).weight
    vocab_size = lm_head_weight.shape[0]
    feature_layers = config.feature_layers
    if cache is not None:
        cache.check_model(config.model)
        if cache.feature_layers is None:
            raise ValueError(f"{config.cache}: this cache holds only final hidden states; make it with "
                             "`medusaforge cache --eagle3-features` for EAGLE-3 training")
        if feature_layers is not None and tuple(feature_layers) != cache.feature_layers:
            raise ValueError(f"{config.cache}: holds feature layers {list(cache.feature_layers)}, --feature-layers asks for {feature_layers}")
        feature_layers = feature_layers or cache.feature_layers
        log(f"offline: features from {config.cache} (layers {cache.feature_layers}); the base model is not run")
    train_indices, eval_indices = split_examples(len(data), config.eval_fraction, config.seed)
    log(f"data: {len(data)} conversations ({len(train_indices)} train, {len(eval_indices)} held out), "
        f"{data.num_loss_tokens()} assistant tokens, {data.num_invalid} invalid records skipped")

    # ---- draft, vocabulary, optimizer, schedule ----
    draft_config = draft_config_from_base(base.config, min(config.draft_vocab, vocab_size), feature_layers)
    draft_config.base_model, draft_config.base_fingerprint = model_name(base), base_fingerprint(base)
    draft = Eagle3Draft(draft_config, base.get_input_embeddings())
    all_tokens = torch.arange(vocab_size)
    source = (Eagle3OfflineBatches(cache, lm_head_weight, all_tokens) if cache else
              Eagle3OnlineBatches(base, data, tokenizer.pad_token_id, draft.feature_layers, lm_head_weight, all_tokens))
    vocab_coverage = 1.0
    if config.draft_vocab < vocab_size and not config.resume:  # a resume takes the maps from its checkpoint
        token_map, vocab_coverage = choose_draft_vocab(source, data, train_indices, config, vocab_size, device, autocast)
        draft.set_vocab(*vocab_maps(token_map, vocab_size))
        log(f"draft vocabulary: {config.draft_vocab} of {vocab_size} tokens cover {vocab_coverage:.1%} of the base's predictions")
    if config.init_from_base:
        with torch.no_grad():
            draft.lm_head.weight.copy_(lm_head_weight[draft.to_target(torch.arange(draft_config.draft_vocab_size))])
            draft.norm.weight.copy_(base.get_decoder().norm.weight)
    high = draft.feature_layers[2]
    if config.init_layer_from_base and high < len(base.get_decoder().layers):  # index L is post-norm: no layer reads it
        try:
            start_layer_from(draft, base.get_decoder().layers[high])
        except ValueError as error:  # a layer not shaped like Llama's, e.g. a mixture-of-experts MLP
            log(f"the draft's layer starts random: base layer {high} does not fit it ({error})")
    draft.to(device)
    num_steps, weights = config.num_steps, step_weights(config.num_steps, config.step_weight_decay)

    micro_batches, budget = plan_and_budget(config, data.lengths.tolist(), train_indices)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule([{"params": trainable, "lr": config.lr}], config, budget.total, budget)
    schedule = schedule_fingerprint(config, len(train_indices), budget.planned_steps)

    start_step, skipped_steps = resume(config, out, draft, optimizer, scheduler, schedule, log, context.rank,
                                       load_weights=lambda folder: load_draft(folder, draft.embed_tokens), budget=budget)
    source.token_map = draft.to_target(torch.arange(draft_config.draft_vocab_size, device=device))  # a resume restores d2t
    if config.fsdp_base and cache is None:  # after every read of the full base weights (fingerprint, lm_head, norm)
        shard_frozen_base(base, context, keep_whole=(base.get_input_embeddings().weight,))  # the draft embeds with it
    draft_with_loss = wrap_heads_for_ddp(DraftWithLoss(draft, num_steps, config.chunk_size), context)

    metrics_file = open_metrics(out, config, start_step, "eagle3") if context.is_main else None
    progress = tqdm(initial=start_step, total=budget.total, disable=not (config.progress and context.is_main), desc="train eagle3")
    draft.train()
    started = time.perf_counter()
    tokens_seen = 0

    # ---- the loop: until the step budget, which --max-minutes may shrink as it goes ----
    step = start_step
    while step < budget.total:
        step_started = time.perf_counter()
        batches = [rank_batch(source, micro_batches[step * config.grad_accum + j], context) for j in range(config.grad_accum)]
        # Normalise by the counted positions of the whole optimizer step over all ranks, so
        # accumulation and data parallelism both give exactly the loss of one big batch.
        step_counts = torch.zeros(num_steps)
        for batch in batches:
            for k in range(num_steps):
                step_counts[k] += step_positions(batch["loss_mask"], k).sum()
        step_counts = all_reduce_sum(step_counts, context).clamp(min=1)

        loss_value = torch.zeros((), dtype=torch.float64)
        step_loss, step_top1 = torch.zeros(num_steps), torch.zeros(num_steps)
        for j, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = j == len(batches) - 1
            # DDP all-reduces gradients during backward; only the step's last micro-batch needs it.
            with nullcontext() if last or not context.enabled else draft_with_loss.no_sync():
                with autocast:
                    features, target_logits, base_argmax = source.inputs(batch)  # the frozen base forward
                    result = draft_with_loss(features, batch["input_ids"], target_logits, base_argmax, batch["loss_mask"])
                    loss = sum(weights[k] * result.loss_sums[k] / step_counts[k] for k in range(num_steps))
                # DDP averages gradients over ranks; scaling by world_size gives the global sum's gradient.
                (loss * context.world_size).backward()
            loss_value += loss.detach().double().cpu()  # a host-device sync, once per micro-batch
            step_loss += torch.stack([s.detach().float().cpu() for s in result.loss_sums]) / step_counts
            step_top1 += result.top1 / step_counts
            tokens_seen += int(batch["attention_mask"].sum())
        step_stats = all_reduce_sum(torch.cat([loss_value.view(1), step_loss.double(), step_top1.double()]), context)
        loss_value = float(step_stats[0])
        step_loss, step_top1 = step_stats[1:].float().view(2, num_steps)

        # --max-minutes: the total shrinks to the steps that fit, and this step's LR follows it.
        if settle_budget(budget, step + 1, step_started, started, optimizer, scheduler, context):
            progress.total = budget.total

        # After DDP's all-reduce every rank has the same gradients, norm and loss: all take the same branch.
        grad_norm, finite = optimizer_step(optimizer, scheduler, trainable, config, step, loss_value, out)
        if not finite:
            skipped_steps += 1
            log(f"step {step + 1}: loss {loss_value}, gradient norm {grad_norm}: not finite, step skipped ({skipped_steps} so far)")

        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.3f}", acc0=f"{step_top1[0]:.3f}")
        if context.is_main and ((step + 1) % config.log_every == 0 or step + 1 == budget.total):
            record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                      "step_loss": step_loss.tolist(), "step_top1": step_top1.tolist(), "skipped": not finite,
                      "tokens_per_s": tokens_seen * context.world_size / (time.perf_counter() - started),
                      "seconds": round(time.perf_counter() - started, 1)}
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        step += 1
        if config.eval_every and step % config.eval_every == 0 and step < budget.total and eval_indices:
            evaluate = partial(evaluate_draft,
                               draft, source, eval_indices, config.batch_size, num_steps, device, autocast, context, config.chunk_size)
            started = held_out_point(draft, evaluate, metrics_file, step, started)
        extra = {"data_position": step * config.grad_accum, "world_size": context.world_size, "schedule": schedule,
                 "skipped_nonfinite": skipped_steps, "budget": budget.state(time.perf_counter() - started)}
        if config.save_every and step % config.save_every == 0 and step < budget.total:
            write_checkpoint(out, step, draft, optimizer, scheduler, extra, config.keep_last, context)
    progress.close()
    if metrics_file is not None:
        metrics_file.close()
    elapsed = time.perf_counter() - started
    total_steps = budget.total

    # ---- save and evaluate ----
    extra = {"data_position": total_steps * config.grad_accum, "world_size": context.world_size, "schedule": schedule,
             "skipped_nonfinite": skipped_steps, "budget": budget.state(elapsed)}
    write_checkpoint(out, total_steps, draft, optimizer, scheduler, extra, config.keep_last, context)
    if context.is_main:
        draft.save(out / "draft")
    draft.eval()
    held_out = (evaluate_draft(draft, source, eval_indices, config.batch_size, num_steps, device, autocast, context, config.chunk_size)
                if eval_indices else None)
    summary = {
        "method": "eagle3",
        "model": draft_config.base_model,
        "data": str(config.data),
        "hidden_states": str(config.cache) if config.cache else "online",
        "num_steps": num_steps,
        "feature_layers": list(draft.feature_layers),
        "draft_vocab": draft_config.draft_vocab_size,
        "draft_vocab_coverage": vocab_coverage,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "steps": total_steps,
        "planned_steps": budget.planned_steps,
        "max_minutes": config.max_minutes,
        "batch_tokens": config.batch_tokens,
        "train_conversations": len(train_indices),
        "eval_conversations": len(eval_indices),
        "train_seconds": round(elapsed, 1),
        "train_tokens": tokens_seen * context.world_size,
        "invalid_records_skipped": data.num_invalid,
        "nonfinite_steps_skipped": skipped_steps,
        "world_size": context.world_size,
        "held_out": held_out,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if not context.is_main:
        return summary
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    if held_out is not None:
        # The last metrics line: held-out figures per draft step, at the final step (a resume before
        # the end drops it with the other lines past its checkpoint, and writes it again).
        with open(out / "metrics.jsonl", "a") as metrics_file:
            metrics_file.write(json.dumps({"step": total_steps, "held_out_top1": held_out["top1"], "held_out_loss": held_out["loss"]}) + "\n")
        print("held-out top-1 per step: " + " ".join(f"{t:.3f}" for t in held_out["top1"]))
    print(f"draft saved to {out / 'draft'}; {total_steps} steps in {elapsed:.0f} s, peak RSS {summary['peak_rss_bytes'] / 2**30:.2f} GiB")
    return summary
