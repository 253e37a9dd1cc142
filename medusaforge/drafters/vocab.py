"""Truncated head vocabulary: each head projects only to the most frequent target tokens.

vLLM's Medusa config calls this `truncated_vocab_size`; the heads carry a `token_map`
[head_vocab] of full-vocabulary ids, and decoding maps head outputs back through it.
"""

from __future__ import annotations

import torch


def target_token_counts(input_ids: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab_size] int64: how often each token is a training target (an assistant token).

    input_ids, loss_mask: any matching shapes (e.g. all examples concatenated).
    """
    return torch.bincount(input_ids[loss_mask.bool()].flatten(), minlength=vocab_size)[:vocab_size]


def most_frequent_tokens(counts: torch.Tensor, head_vocab_size: int) -> tuple[torch.Tensor, float]:
    """(token_map [head_vocab_size] ascending ids, share of target tokens it covers).

    Ties go to the lower id, so the map depends only on the counts.
    """
    if not 0 < head_vocab_size <= len(counts):
        raise ValueError(f"--head-vocab must be in [1, {len(counts)}], got {head_vocab_size}")
    # Stable sort on -count keeps ascending ids among equal counts.
    order = torch.sort(-counts, stable=True).indices
    token_map = torch.sort(order[:head_vocab_size]).values
    total = int(counts.sum())
    coverage = float(counts[token_map].sum()) / total if total else 1.0
    return token_map, coverage
