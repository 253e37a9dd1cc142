"""`train --plan`: the memory a training run needs per device, as pure functions of shapes.

Every function here takes counts (parameters, tokens, widths, bytes per value) and returns bytes,
so each term can be checked by hand. What the recipes keep in memory, and so what is counted:

- The frozen base, in fp32: the recipes load it with `load_base_model`'s default dtype and run it
  under bf16 autocast (training/sources.py, training/eagle3.py). Replicated on every rank, or with
  `--fsdp-base` each decoder layer is sharded (FSDP2) and all-gathered in turn during the forward
  (two layers at a time with FSDP2's prefetch); the embedding, final norm and lm_head stay whole.
- The trainable part (Medusa heads, the EAGLE-3 draft) in fp32: weights, gradients and AdamW's two
  moments; there is no separate master copy because the weights themselves are fp32. Under DDP
  (world > 1) the gradient buckets hold one more copy of the gradients. Sharding the trainable
  part (FSDP full shard) divides the persistent terms by the world size but adds the gathered
  weights and unsharded gradients while a micro-batch runs.
- Autocast keeps one bf16 copy of every trainable weight for the whole autocast region.
- Activations of one micro-batch of `sequences x length` tokens on this rank, counted at the
  worst case where every sequence has the full length and every position is a target.

Bytes per value: `compute` is 2 under bf16 autocast, 4 in fp32; `FP32` is 4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FP32 = 4
GIB = 1024**3
LAYOUTS = ("ddp", "ddp+fsdp-base", "fsdp", "fsdp+fsdp-base")  # trainable part x frozen base


@dataclass(frozen=True)
class BaseShape:
    """What the plan needs to know about the base model (counted on the meta device)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    total_params: int
    layer_params: int  # one decoder layer
    lm_head_params: int  # 0 when the lm_head is tied to the input embedding

    @property
    def edge_params(self) -> int:
        """Embedding and final norm: the decoder's parameters outside its layers."""
        return self.total_params - self.num_layers * self.layer_params - self.lm_head_params


@dataclass(frozen=True)
class Workload:
    """One micro-batch on one rank, and how the recipe treats it."""

    recipe: str  # "medusa1" or "eagle3"
    sequences: int  # sequences on this rank per micro-batch
    length: int  # --max-length
    compute: int  # bytes per value of the autocast compute dtype (2 bf16, 4 fp32)
    online: bool  # the base runs every micro-batch (False: hidden states come from a cache)
    num_heads: int = 0  # Medusa heads
    num_layers: int = 0  # ResBlocks per head
    head_vocab: int = 0  # rows of each head's own projection (0: shared with the frozen base lm_head)
    chunk_size: int = 512  # rows per chunk of the head / step loss
    soft_targets: bool = False  # Medusa heads also learn the base's distribution (--soft-targets)
    num_steps: int = 0  # EAGLE-3 training-time-test steps
    draft_vocab: int = 0  # EAGLE-3 draft vocabulary
    cache_bytes: int = 2  # bytes per stored value in a hidden-state cache (bf16)

    @property
    def tokens(self) -> int:
        return self.sequences * self.length


def rank_sequences(batch_size: int, world_size: int) -> int:
    """Sequences one rank holds per micro-batch: its strided share of the global batch (at least one,
    since a rank left without any runs a masked placeholder)."""
    return max(1, math.ceil(batch_size / world_size))


def trainable_state_bytes(params: int, world_size: int, shard: bool) -> dict[str, int]:
    """fp32 weights, gradients and AdamW moments (exp_avg, exp_avg_sq) of `params` trainable values.

    DDP (world > 1) adds its gradient buckets (one more gradient copy). FSDP full shard keeps 1/world
    of each persistent term and, while a micro-batch runs, the gathered weights and unsharded gradients."""
    share = math.ceil(params / world_size) if shard else params
    terms = {"weights": FP32 * share, "gradients": FP32 * share, "optimizer": 2 * FP32 * share, "comm": 0}
    if shard and world_size > 1:
        terms["comm"] = 2 * FP32 * params  # gathered weights + unsharded gradients before reduce-scatter
    elif world_size > 1:
        terms["comm"] = FP32 * params  # DDP gradient buckets
    return terms


def base_weight_bytes(shape: BaseShape, world_size: int, shard: bool, dtype_bytes: int = FP32) -> int:
    """The frozen base on one rank: whole, or (FSDP2 per decoder layer) 1/world of the layers plus two
    gathered layers, with the embedding, final norm and lm_head whole."""
    if not shard or world_size == 1:
        return dtype_bytes * shape.total_params
    layers = math.ceil(shape.num_layers * shape.layer_params / world_size) + 2 * shape.layer_params
    return dtype_bytes * (layers + shape.edge_params + shape.lm_head_params)


def base_forward_bytes(shape: BaseShape, tokens: int, compute: int, keep_all_hidden: bool) -> int:
    """Peak of the frozen base's no-grad forward over `tokens` positions.

    The residual stream is fp32 (fp32 weights, the norms return fp32): the final hidden state, or with
    `keep_all_hidden` (EAGLE-3 reads three layers through output_hidden_states) all L+1 of them,
    live to the end. Inside a layer the MLP's gate, up and product ([tokens, intermediate] in the
    compute dtype) and about four residual-width temporaries peak together; attention is a fused
    kernel (SDPA) whose memory grows with the tokens, not their square."""
    kept = (shape.num_layers + 1 if keep_all_hidden else 1) * FP32 * tokens * shape.hidden_size
    layer = tokens * (3 * compute * shape.intermediate_size + 4 * FP32 * shape.hidden_size)
    return kept + layer


def lm_head_targets_bytes(shape: BaseShape, compute: int, chunk: int = 1024) -> int:
    """EAGLE-3 targets (eagle3_features.targets_from_final): one [chunk, vocab] block of base logits in
    the compute dtype and in fp32, plus under bf16 autocast the lm_head's bf16 copy made at every call
    (a frozen weight is not in autocast's cache)."""
    weight_copy = compute * shape.vocab_size * shape.hidden_size if compute < FP32 else 0
    return chunk * shape.vocab_size * (compute + FP32) + weight_copy


def medusa_activation_bytes(shape: BaseShape, work: Workload) -> int:
    """Heads forward + loss for one micro-batch, kept until backward (training/loss.py).

    Per head, over N = tokens target positions: the gathered hidden states [N, H] fp32; per ResBlock the
    linear's input cast and output (compute) and the fp32 residual sum; the loss keeps d(loss)/dx [N, H]
    fp32 and, for an own projection, d(loss)/dW [head_vocab, H] fp32. While a chunk is computed:
    its logits in the compute dtype and fp32, and the fp32 softmax-minus-one-hot made in place; with
    soft targets also the base's logits and probabilities of the chunk over the full vocabulary."""
    tokens, hidden = work.tokens, shape.hidden_size
    per_head = tokens * hidden * (FP32 + work.num_layers * (2 * work.compute + FP32) + FP32)
    if work.head_vocab:
        per_head += FP32 * work.head_vocab * hidden
    rows = work.head_vocab or shape.vocab_size
    chunk = min(work.chunk_size, tokens) * rows * (work.compute + 2 * FP32)
    if work.soft_targets:
        chunk += min(work.chunk_size, tokens) * shape.vocab_size * (work.compute + 2 * FP32)
    return work.num_heads * per_head + chunk


def eagle3_step_bytes(shape: BaseShape, tokens: int, length: int, step: int, compute: int) -> int:
    """Activations one training-time-test step of the draft layer keeps for backward (Eagle3Draft.unroll).

    Per token: three RMSNorms (fp32 input and normalised value, compute-dtype output), the [2H]
    attention input cast once per q/k/v projection, the residual and MLP-input casts (H terms);
    q and the repeated k, v (heads x head_dim, compute) and the fp32 copies of q and of each earlier
    step's keys for the diagonal scores; gate, up, SiLU and product ([intermediate], compute); and
    the attention probabilities [heads, length + step] in fp32 (softmax output) plus their cast."""
    hidden, width = shape.hidden_size, shape.num_heads * shape.head_dim
    h_terms = hidden * (3 * (2 * FP32 + compute) + 3 * 2 * compute + 4 * compute)
    qkv_terms = width * (4 * compute + 2 * FP32 * step)
    mlp_terms = 4 * compute * shape.intermediate_size
    probs = shape.num_heads * (length + step) * (FP32 + (compute if compute != FP32 else 0))
    return tokens * (h_terms + qkv_terms + mlp_terms + probs)


def eagle3_activation_bytes(shape: BaseShape, work: Workload) -> int:
    """The draft's unroll and loss for one micro-batch (training/eagle3_loss.py), kept until backward.

    Inputs held for the step: the fused features [T, 3H] fp32 and their cast for `fc`, and the target
    logits [T, draft_vocab] fp32. Then every step's layer activations, and per step the chunked loss
    (loss.ChunkedLinearCrossEntropy): the gathered, normed hidden states [N, H], d(loss)/dx [N, H] fp32
    and d(loss)/d lm_head [draft_vocab, H] fp32, kept until backward. On top, transient: the last
    step's attention scores, and one loss chunk's logits (compute, fp32), softmax and target
    probabilities [chunk, draft_vocab] fp32."""
    tokens, hidden, vocab = work.tokens, shape.hidden_size, work.draft_vocab
    inputs = tokens * (3 * hidden * (FP32 + work.compute) + FP32 * vocab)
    steps = sum(eagle3_step_bytes(shape, tokens, work.length, k, work.compute) for k in range(work.num_steps))
    loss = work.num_steps * (tokens * hidden * (3 * FP32 + work.compute) + FP32 * vocab * hidden)
    scores = tokens * shape.num_heads * (work.length + work.num_steps) * 2 * work.compute
    chunk = min(work.chunk_size, tokens) * vocab * (work.compute + 3 * FP32)
    return inputs + steps + loss + max(scores, chunk)


def cache_read_bytes(shape: BaseShape, work: Workload) -> int:
    """An offline micro-batch read from a cache: stored values (final hidden, plus three feature layers
    for EAGLE-3) and their fp32 copy."""
    width = shape.hidden_size * (4 if work.recipe == "eagle3" else 1)
    return work.tokens * width * (work.cache_bytes + FP32)


def activation_bytes(shape: BaseShape, work: Workload) -> dict[str, int]:
    """Activation terms of one micro-batch: the base forward (or cache read), the targets, the drafter."""
    terms = {"base_forward": 0, "targets": 0, "drafter": 0}
    if work.online:
        terms["base_forward"] = base_forward_bytes(shape, work.tokens, work.compute, keep_all_hidden=work.recipe == "eagle3")
    else:
        terms["base_forward"] = cache_read_bytes(shape, work)
    if work.recipe == "eagle3":
        terms["targets"] = lm_head_targets_bytes(shape, work.compute)
        terms["drafter"] = eagle3_activation_bytes(shape, work)
    else:
        terms["drafter"] = medusa_activation_bytes(shape, work)
    return terms


@dataclass(frozen=True)
class PlanRow:
    gpus: int
    layout: str
    base_weights: int
    trainable: dict[str, int]
    autocast_copies: int
    activations: dict[str, int]
    runtime: int

    @property
    def total(self) -> int:
        return (self.base_weights + sum(self.trainable.values()) + self.autocast_copies
                + sum(self.activations.values()) + self.runtime)


def plan_row(shape: BaseShape, trainable_params: int, work: Workload, gpus: int, layout: str,
             base_loaded: bool, runtime: int) -> PlanRow:
    """Memory of one rank for a world of `gpus` in `layout` (see LAYOUTS). `work` is already this
    rank's micro-batch; `base_loaded` is False for an offline Medusa run (only the lm_head is read)."""
    shard_trainable, shard_base = layout.startswith("fsdp"), layout.endswith("fsdp-base")
    if base_loaded:
        base = base_weight_bytes(shape, gpus, shard_base)
    else:
        base = FP32 * shape.vocab_size * shape.hidden_size  # the lm_head weight alone, fp32
    autocast = 2 * trainable_params if work.compute < FP32 else 0
    return PlanRow(gpus, layout, base, trainable_state_bytes(trainable_params, gpus, shard_trainable), autocast,
                   activation_bytes(shape, work), runtime)


def gib(value: int) -> str:
    return f"{value / GIB:.2f}"


def format_rows(rows: list[PlanRow], device_memory_gib: float) -> list[str]:
    """One table line per row, in GiB, with whether it fits `device_memory_gib`."""
    # base-w: frozen base weights; train-w/grads/adamw/comm: the trainable part; bf16cp: autocast copies;
    # base-fw: base forward (or cache read); targets: EAGLE-3 target logits; act: heads/draft activations.
    header = (f"{'gpus':>4}  {'layout':<15} {'base-w':>7} {'train-w':>7} {'grads':>7} {'adamw':>7} {'comm':>6} "
              f"{'bf16cp':>6} {'base-fw':>7} {'targets':>7} {'act':>7} {'total':>7}  fits {device_memory_gib:g} GiB")
    lines = [header]
    for row in rows:
        t, a = row.trainable, row.activations
        fits = "yes" if row.total <= device_memory_gib * GIB else "NO"
        lines.append(f"{row.gpus:>4}  {row.layout:<15} {gib(row.base_weights):>7} {gib(t['weights']):>7} {gib(t['gradients']):>7} "
                     f"{gib(t['optimizer']):>7} {gib(t['comm']):>6} {gib(row.autocast_copies):>6} {gib(a['base_forward']):>7} "
                     f"{gib(a['targets']):>7} {gib(a['drafter']):>7} {gib(row.total):>7}  {fits}")
    return lines
