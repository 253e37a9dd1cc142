"""Full-vocabulary projections for heads trained on a truncated vocabulary, and how well they keep top-1.

A truncated head projects to `head_vocab` tokens (`token_map`). Two layouts cannot say so:
vLLM 0.32 builds every per-head `lm_heads.{k}` with the full vocabulary (only the shared
`original_lm_head` may be truncated), and the original Medusa layout has no token map at all. So
the head's `[head_vocab, hidden]` rows must become `[vocab, hidden]`: the trained rows at
`token_map`, and rows for the other tokens that should never win. Neither layout has a projection
bias, so no row can score "very negative" for every hidden state. Two fills:

- `SHADOW`: each out-of-map row copies the row of the nearest in-map token with a lower id, so its
  logit equals that token's, and argmax (the first index among equal values, in torch and in
  vLLM's Medusa proposer) returns the lower, in-map id. Top-1 is kept exactly as long as the
  matmul gives identical rows identical logits (torch's CPU GEMM does, in fp32 and bf16, at
  SmolLM2's shape). The ids below the first in-map id j0 have no lower twin (a copy would win
  the tie): they get j0's row times `BELOW_FIRST_SCALE`, which scores below j0 when j0's logit is
  positive and can only win when every trained logit is negative and j0's is within 1/16 of the
  best. For top-1 chains (vLLM). Wrong for trees: every copy is a tied top-k candidate.
- `ZERO`: logit 0, which wins only when every in-map logit is negative. For the original layout,
  whose readers (FasterDecoding, TensorRT-LLM) take each head's top-k for a tree.

`top1_agreement` measures, on real hidden states, how often the full-vocabulary head picks the
same token as the trained one; export prints it and writes it into the model card.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

SHADOW = "shadow"
ZERO = "zero"
FILLS = (SHADOW, ZERO)
# 15/16: exact in bf16, and far enough below 1 that rounding the scaled row cannot tie it with j0's.
BELOW_FIRST_SCALE = 0.9375


def shadow_sources(token_map: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64: for each token id, the index into `token_map` of the largest in-map id
    <= it, or -1 when no in-map id is that low. In-map ids point at themselves.

    token_map [5, 2, 7], vocab 9 -> [-1, -1, 1, 1, 1, 0, 0, 2, 2].
    """
    sorted_ids, order = torch.sort(token_map.long())
    below = torch.searchsorted(sorted_ids, torch.arange(vocab_size), right=True) - 1
    return torch.where(below >= 0, order[below.clamp(min=0)], torch.full_like(below, -1))


def full_vocab_rows(rows: torch.Tensor, token_map: torch.Tensor, vocab_size: int, fill: str) -> torch.Tensor:
    """rows [head_vocab, hidden] over token_map -> [vocab_size, hidden] (see the module docstring).
    The rows at token_map are the trained ones, bit for bit."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    rows = rows.detach()
    token_map = token_map.long().to(rows.device)
    full = rows.new_zeros(vocab_size, rows.shape[1])
    if fill == SHADOW:
        sources = shadow_sources(token_map.cpu(), vocab_size).to(rows.device)
        has_source = sources >= 0
        full[has_source] = rows[sources[has_source]]
        first = int(torch.argmin(token_map))  # index of j0, the lowest in-map id
        full[~has_source] = rows[first] * BELOW_FIRST_SCALE
    full[token_map] = rows
    return full


def top1_agreement(
    transformed: torch.Tensor, trained_rows: torch.Tensor, token_map: torch.Tensor | None, full_rows: torch.Tensor
) -> float:
    """Share of positions where the full-vocabulary projection's argmax is the trained head's.

    transformed [N, hidden]: hidden states after the head's ResBlocks; trained_rows [head_vocab,
    hidden] with token_map (None: already full vocabulary); full_rows [vocab, hidden]. Computed in
    float32 so that the comparison is about the rows, not rounding.
    """
    if not len(transformed):
        return 1.0
    trained_rows, full_rows, kept = trained_rows.float(), full_rows.float(), 0
    # In chunks: [N, vocab] float32 logits for 20k states and SmolLM2's 49k tokens would be 3.9 GB.
    for chunk in transformed.float().split(1024):
        kept += int((trained_top1(chunk, trained_rows, token_map, full_rows.shape[0])
                     == F.linear(chunk, full_rows).argmax(-1)).sum())
    return kept / len(transformed)


def trained_top1(transformed: torch.Tensor, rows: torch.Tensor, token_map: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """[N] full-vocabulary id of the trained head's top-1, ties to the lowest id as in
    MedusaHeads.head_logits (logits scattered into vocabulary order before argmax)."""
    logits = F.linear(transformed, rows)
    if token_map is None:
        return logits.argmax(-1)
    full = logits.new_full((len(logits), vocab_size), -torch.inf)
    return full.index_copy_(-1, token_map.long().to(logits.device), logits).argmax(-1)
