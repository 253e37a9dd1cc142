"""What an EAGLE-3 training step reads from the base model: three feature layers and the targets.

Per micro-batch the recipe needs, for every position:
  features [B, T, 3H]   HF hidden_states at the draft's feature layers (low, mid, high), concatenated
  target_logits [B, T, draft_vocab]   base logits at the draft vocabulary's tokens (fp32)
  base_argmax [B, T]    the base's greedy choice over the full vocabulary (for top-1)
Targets come from the final post-norm hidden state and the base lm_head, so an offline cache needs
only the three feature layers plus the final hidden state (4H values per token).

Two sources with the same methods, so the loop is written once:
  collate(indices) -> batch dict (input_ids, loss_mask, attention_mask [B, T]; offline also the stored states)
  inputs(batch) -> (features, target_logits, base_argmax);  base_argmax(batch) -> [B, T]
`Eagle3OnlineBatches` runs the frozen base per micro-batch (no_grad); `Eagle3OfflineBatches` reads
`medusaforge cache --eagle3-features` output and never runs the base.
"""

from __future__ import annotations

import torch

from medusaforge.data.conversations import TokenizedData, collate
from medusaforge.models import final_and_feature_states
from medusaforge.training.hidden_cache import HiddenCache

# Positions per lm_head chunk when computing targets: [chunk, vocab] fp32 at a time.
TARGET_CHUNK = 1024


@torch.no_grad()
def targets_from_final(final: torch.Tensor, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """final [B, T, H] -> (base logits at token_map [B, T, draft_vocab] fp32, full-vocab argmax [B, T]).

    Chunked over positions so the full-vocabulary logits never exist for the whole batch at once."""
    batch, length, hidden = final.shape
    flat = final.reshape(-1, hidden)
    weight = lm_head_weight.to(flat.dtype)
    restricted, argmax = [], []
    for start in range(0, flat.shape[0], TARGET_CHUNK):
        logits = (flat[start : start + TARGET_CHUNK] @ weight.T).float()
        restricted.append(logits[:, token_map])
        argmax.append(logits.argmax(-1))
    return torch.cat(restricted).view(batch, length, -1), torch.cat(argmax).view(batch, length)


@torch.no_grad()
def base_statistics(final: torch.Tensor, lm_head_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """final [N, H] -> (full-vocabulary argmax [N] int64, logsumexp of the logits [N] fp32), chunked.

    `medusaforge cache` stores both per token (8 bytes), so offline training never multiplies by the
    whole lm_head again: EAGLE-3 then needs only its draft vocabulary's rows for the targets, and
    the heads' soft targets only their kept rows."""
    weight = lm_head_weight.to(final.dtype)
    argmax, log_normaliser = [], []
    for start in range(0, final.shape[0], TARGET_CHUNK):
        logits = (final[start : start + TARGET_CHUNK] @ weight.T).float()
        argmax.append(logits.argmax(-1))
        log_normaliser.append(torch.logsumexp(logits, dim=-1))
    if not argmax:
        return torch.zeros(0, dtype=torch.long, device=final.device), torch.zeros(0, device=final.device)
    return torch.cat(argmax), torch.cat(log_normaliser)


@torch.no_grad()
def restricted_logits(final: torch.Tensor, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """final [B, T, H] -> base logits at token_map [B, T, len(token_map)] fp32, from those rows of the lm_head only."""
    batch, length, hidden = final.shape
    flat = final.reshape(-1, hidden)
    weight = lm_head_weight[token_map].to(flat.dtype)
    parts = [(flat[start : start + TARGET_CHUNK] @ weight.T).float() for start in range(0, flat.shape[0], TARGET_CHUNK)]
    return torch.cat(parts).view(batch, length, -1)


class Eagle3OnlineBatches:
    """Runs the frozen base model on each micro-batch."""

    def __init__(self, base, data: TokenizedData, pad_token_id: int, feature_layers, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> None:
        self.base, self.data, self.pad_token_id = base, data, pad_token_id
        self.feature_layers = tuple(feature_layers)
        self.lm_head_weight, self.token_map = lm_head_weight, token_map

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.data.example(i) for i in indices], self.pad_token_id)

    @torch.no_grad()
    def states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (features [B, T, 3H], final post-norm hidden [B, T, H]) from one frozen base forward."""
        final, features = final_and_feature_states(self.base, batch["input_ids"], batch["attention_mask"], self.feature_layers)
        return features, final

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features [B, T, 3H], target_logits [B, T, draft_vocab], base_argmax [B, T])."""
        features, final = self.states(batch)
        target_logits, base_argmax = targets_from_final(final, self.lm_head_weight, self.token_map.to(final.device))
        return features, target_logits, base_argmax

    def base_argmax(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] greedy base predictions (for choosing the draft vocabulary)."""
        _, final = self.states(batch)
        return targets_from_final(final, self.lm_head_weight, self.token_map[:1].to(final.device))[1]


class Eagle3OfflineBatches(Eagle3OnlineBatches):
    """Reads each example's stored feature layers and final hidden state from a `HiddenCache`, and
    the base's argmax per token where the cache holds it (then the targets need only the draft
    vocabulary's lm_head rows, a sixth of the work on SmolLM2 at 8,192 tokens)."""

    def __init__(self, cache: HiddenCache, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> None:
        super().__init__(None, cache.data, 0, cache.feature_layers, lm_head_weight, token_map)
        self.cache = cache

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # Padding is masked out of the loss and, being at the end, never attended to by a counted position.
        batch = collate([self.data.example(i) for i in indices], pad_token_id=0)
        names = ["hidden", "features"] + (["base_argmax"] if self.cache.has("base_argmax") else [])
        for name in names:
            batch[name] = self.cache.padded(name, indices, batch["input_ids"].shape)
        return batch

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if "base_argmax" not in batch:
            return super().inputs(batch)
        features, final = self.states(batch)
        return features, restricted_logits(final, self.lm_head_weight, self.token_map.to(final.device)), batch["base_argmax"].long()

    def base_argmax(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["base_argmax"].long() if "base_argmax" in batch else super().base_argmax(batch)

    def states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # Stored in bf16/fp16; fp32 here, as the online path's base output under fp32.
        return batch["features"].float(), batch["hidden"].float()
