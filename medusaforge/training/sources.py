"""Where a training micro-batch's hidden states come from: the base model (online) or a cache (offline).

Both sources have the same two methods, so the training loop is written once:
  collate(indices) -> batch dict (input_ids, loss_mask, attention_mask [B, T]; offline also hidden)
  hidden_states(batch) -> [B, T, hidden] final post-norm hidden states of the base model
Online runs the frozen base under no_grad; offline reads `medusaforge cache` output and never
touches the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medusaforge.data.conversations import TokenizedData, collate, load_tokenized
from medusaforge.models import (
    base_fingerprint,
    final_hidden_states,
    lm_head_of,
    load_base_model,
    load_tokenizer,
    model_name,
    read_lm_head_weight,
)
from medusaforge.training.distributed import DistributedContext, main_process_first
from medusaforge.training.hidden_cache import HiddenCache


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
        batch["hidden"] = self.cache.padded("hidden", indices, batch["input_ids"].shape)
        if self.cache.has("log_normaliser"):
            # The base's logsumexp per token: soft targets then need only the heads' kept lm_head rows.
            batch["log_normaliser"] = self.cache.padded("log_normaliser", indices, batch["input_ids"].shape)
        return batch

    def hidden_states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Stored in bf16/fp16; fp32 here so an fp32 run's heads accept it (autocast still runs bf16).
        return batch["hidden"].float()


@dataclass
class SourceSetup:
    """What a recipe needs from where its hidden states come from."""

    source: OnlineBatches | OfflineBatches
    data: TokenizedData
    base: torch.nn.Module | None  # None offline: the base is never loaded
    lm_head_weight: torch.Tensor  # [vocab, hidden]
    base_name: str
    base_fingerprint: str
    pad_token_id: int


def open_source(config, context: DistributedContext, log) -> SourceSetup:
    """The frozen base and tokenized --data (online), or the --cache folder (offline: of the base,
    only lm_head is read, and the cache must have been made by --model)."""
    device = context.device
    if getattr(config, "cache", None) is None:
        # Rank 0 first: it converts a built-in model and tokenizes into the shared cache; the others reuse both.
        with main_process_first(context):
            tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
            base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
            base.requires_grad_(False)
            data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=log)
        return SourceSetup(OnlineBatches(base, data, tokenizer.pad_token_id), data, base, lm_head_of(base).weight,
                           model_name(base), base_fingerprint(base), tokenizer.pad_token_id)
    cache = HiddenCache(config.cache)
    cache.check_model(config.model)
    log(f"offline: hidden states from {config.cache} (max_length {cache.identity['max_length']}); the base model is not run")
    return SourceSetup(OfflineBatches(cache), cache.data, None, read_lm_head_weight(config.model).to(device),
                       cache.identity["model"], cache.identity["base_fingerprint"], 0)


def held_out_source(folder, model: str, log) -> tuple[OfflineBatches, list[int]]:
    """A cache whose every conversation is held out (--held-out-cache): made by the same --model."""
    cache = HiddenCache(folder)
    cache.check_model(model)
    log(f"held out: all {len(cache.data)} conversations of {folder}")
    return OfflineBatches(cache), list(range(len(cache.data)))
