"""Where a training micro-batch's hidden states come from: the base model (online) or a cache (offline).

Both sources have the same two methods, so the training loop is written once:
  collate(indices) -> batch dict (input_ids, loss_mask, attention_mask [B, T]; offline also hidden)
  hidden_states(batch) -> [B, T, hidden] final post-norm hidden states of the base model
Online runs the frozen base under no_grad; offline reads `medusaforge cache` output and never
touches the base model.
"""

from __future__ import annotations

import torch

from medusaforge.data.conversations import TokenizedData, collate
from medusaforge.commands.cache import HiddenCache
from medusaforge.models import final_hidden_states


class OnlineBatches:
    """Runs the frozen base model on each micro-batch."""

    def __init__(self, base, data: TokenizedData, pad_token_id: int) -> None:
        self.base, self.data, self.pad_token_id = base, data, pad_token_id

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.data.example(i) for i in indices], self.pad_token_id)

    @torch.no_grad()
    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return final_hidden_states(self.base, batch["input_ids"], batch["attention_mask"])


class OfflineBatches:
    """Reads each example's stored hidden states from a `HiddenCache`; the base model is never run."""

    def __init__(self, cache: HiddenCache) -> None:
        self.cache, self.data = cache, cache.data

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        # The pad id is irrelevant offline: padding is masked out of the loss, and its hidden
        # states (zeros) are never a head's input at a position whose target counts.
        batch = collate([self.data.example(i) for i in indices], pad_token_id=0)
        stored = [self.cache.hidden(i) for i in indices]  # [T_i, hidden] each, memory-mapped reads
        hidden = torch.zeros((*batch["input_ids"].shape, stored[0].shape[-1]), dtype=stored[0].dtype)
        for row, rows in enumerate(stored):
            hidden[row, : len(rows)] = rows
        batch["hidden"] = hidden
        return batch

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Stored in bf16/fp16; fp32 here so an fp32 run's heads accept it (autocast still runs bf16).
        return batch["hidden"].float()
