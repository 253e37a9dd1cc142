"""The EAGLE-3 draft vocabulary: the tokens the base model itself predicts most often, as d2t / t2d.

EAGLE-3 drafts over a truncated vocabulary because the draft's lm_head dominates its cost. The
draft is trained to imitate the base, so the tokens that matter are the base's own greedy
predictions on the training split (not the data's tokens: human replies use words the base
would not write). Ties, and slots left over when the sample predicts fewer distinct tokens than
the vocabulary holds, are filled by how often the token is a training target, then by lower id.

Maps as SpecForge writes them and vLLM / SGLang read them:
  d2t [draft_vocab] int64: target_id = draft_id + d2t[draft_id]   (draft ids in ascending target order)
  t2d [vocab] bool: the target token is in the draft vocabulary
"""

from __future__ import annotations

import torch


def prediction_counts(base_argmax: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[vocab] int64: how often the base's greedy prediction at position t is each token, counted
    where the token at t+1 is an assistant token (the positions a draft is trained on).

    base_argmax [B, T]: argmax of the base logits at each position; loss_mask [B, T]: True on
    assistant tokens (data/conversations' mask, not shifted)."""
    predicts_target = torch.zeros_like(loss_mask, dtype=torch.bool)
    predicts_target[:, :-1] = loss_mask[:, 1:].bool()
    return torch.bincount(base_argmax[predicts_target].flatten(), minlength=vocab_size)[:vocab_size]


def select_draft_vocab(prediction_counts: torch.Tensor, target_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """[draft_vocab_size] ascending target ids: most predicted first, then most frequent target, then lower id."""
    vocab_size = len(prediction_counts)
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {draft_vocab_size}")
    # One integer key orders by (prediction count, target count); a stable sort keeps lower ids first.
    key = prediction_counts.long() * (int(target_counts.max()) + 1) + target_counts.long()
    order = torch.sort(-key, stable=True).indices
    return torch.sort(order[:draft_vocab_size]).values


def vocab_maps(token_map: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ascending target ids [draft_vocab] -> (d2t [draft_vocab] int64, t2d [vocab] bool)."""
    token_map = token_map.long()
    if len(token_map) > 1 and not bool((token_map[1:] > token_map[:-1]).all()):
        raise ValueError("the draft vocabulary must list distinct target ids in ascending order")
    d2t = token_map - torch.arange(len(token_map))
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[token_map] = True
    return d2t, t2d


def token_map_of(d2t: torch.Tensor) -> torch.Tensor:
    """d2t -> the target id of every draft id (the inverse of `vocab_maps`)."""
    return torch.arange(len(d2t)) + d2t


def coverage(token_map: torch.Tensor, counts: torch.Tensor) -> float:
    """Share of the counted predictions that the draft vocabulary can express."""
    total = int(counts.sum())
    return float(counts[token_map].sum()) / total if total else 1.0
