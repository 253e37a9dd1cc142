"""What an EAGLE-3 training step reads from the base model: three feature layers and the targets.

Per micro-batch the recipe needs, for every position:
  features [B, T, 3H]   HF hidden_states at the draft's feature layers (low, mid, high), concatenated
  target_logits [B, T, draft_vocab]   base logits at the draft vocabulary's tokens (fp32)
  base_argmax [B, T]    the base's greedy choice over the full vocabulary (for top-1)
Targets come from the final post-norm hidden state and the base lm_head, so an offline cache needs
only the three feature layers plus the final hidden state (4H values per token).

`Eagle3OnlineBatches` runs the frozen base per micro-batch; any source with the same `collate` and
`inputs` methods (an offline cache) plugs into the same loop.
"""

from __future__ import annotations

import torch

from medusaforge.data.conversations import TokenizedData, collate

# Positions per lm_head chunk when computing targets: [chunk, vocab] fp32 at a time.
TARGET_CHUNK = 1024


@torch.no_grad()
def base_features(base, input_ids: torch.Tensor, attention_mask: torch.Tensor, feature_layers) -> tuple[torch.Tensor, torch.Tensor]:
    """(features [B, T, 3H], final post-norm hidden [B, T, H]) from one frozen base forward.

    In transformers 5, hidden_states[0] is the embedding output, [j] the output of layer j-1, and
    the last entry is the final post-norm state (equal to last_hidden_state)."""
    outputs = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    states = outputs.hidden_states
    return torch.cat([states[i] for i in feature_layers], dim=-1), outputs.last_hidden_state


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


class Eagle3OnlineBatches:
    """Runs the frozen base model on each micro-batch."""

    def __init__(self, base, data: TokenizedData, pad_token_id: int, feature_layers, lm_head_weight: torch.Tensor, token_map: torch.Tensor) -> None:
        self.base, self.data, self.pad_token_id = base, data, pad_token_id
        self.feature_layers = tuple(feature_layers)
        self.lm_head_weight, self.token_map = lm_head_weight, token_map

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([self.data.example(i) for i in indices], self.pad_token_id)

    def inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (features [B, T, 3H], target_logits [B, T, draft_vocab], base_argmax [B, T])."""
        features, final = base_features(self.base, batch["input_ids"], batch["attention_mask"], self.feature_layers)
        target_logits, base_argmax = targets_from_final(final, self.lm_head_weight, self.token_map.to(final.device))
        return features, target_logits, base_argmax

    @torch.no_grad()
    def base_argmax(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T] greedy base predictions (for choosing the draft vocabulary)."""
        _, final = base_features(self.base, batch["input_ids"], batch["attention_mask"], self.feature_layers)
        return targets_from_final(final, self.lm_head_weight, self.token_map[:1].to(final.device))[1]
