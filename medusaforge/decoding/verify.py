"""One verify step: the base model checks a draft tree in one forward pass over its KV cache.

  1. the tree's nodes are fed at positions prefix length + depth; each node attends to the cached
     prefix, its ancestors and itself;
  2. the base's own choice after every node is compared with that node's children (greedy), or its
     distribution is (typical acceptance); the longest accepted path wins;
  3. the KV entries of the accepted path are moved into place and the rest are cropped, so the cache
     holds exactly what a token-by-token decode would hold.

The cache is transformers' own DynamicCache (written in place, `kv_cache.py`), so any HF Llama/Qwen/Mistral-style decoder works.
Both the decoder and `medusaforge tree`'s timing call `verify_step`, so the timed step is the real one.
"""

from __future__ import annotations

import torch
from torch import nn

from medusaforge.decoding.acceptance import accepted_lengths, best_path, sample, typical_accepted_lengths, typical_best_path
from medusaforge.decoding.speculative_sampling import target_distribution, tree_accept
from medusaforge.decoding.tree import cached_tree_buffers, verify_attention_mask
from medusaforge.drafters.proposer import DraftTree, Verified
from medusaforge.kv_cache import cache_kwarg, new_kv_cache
from medusaforge.models import lm_head_of


def new_cache(base: nn.Module):
    return new_kv_cache(base.config)


def run_decoder(decoder: nn.Module, tokens, positions, cache, attention_mask=None, feature_layers=()):
    """tokens, positions: [1, T] -> ([1, T, hidden] final post-norm hidden states,
    [1, T, len(feature_layers), hidden] or None); appends T KV entries to `cache`."""
    outputs = decoder(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=attention_mask,
        use_cache=True,
        output_hidden_states=bool(feature_layers),
        **{cache_kwarg(decoder): cache},
    )
    features = torch.stack([outputs.hidden_states[i] for i in feature_layers], dim=2) if feature_layers else None
    return outputs.last_hidden_state, features


def keep_cache_entries(cache, prefix_length: int, nodes: torch.Tensor) -> None:
    """Keep only the KV entries of `nodes` (tree node indices, increasing, root first) after the
    first `prefix_length` entries, moved to prefix_length, prefix_length + 1, ... in order."""
    positions = prefix_length + nodes
    kept = prefix_length + len(nodes)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise ValueError("sliding-window KV caches are not supported by the tree decoder")
        # Right-hand side indexing copies first, so overlapping source and target are safe.
        layer.keys[..., prefix_length:kept, :] = layer.keys[..., positions, :]
        layer.values[..., prefix_length:kept, :] = layer.values[..., positions, :]
        layer.keys = layer.keys[..., :kept, :]
        layer.values = layer.values[..., :kept, :]


def crop_cache(cache, length: int) -> None:
    """Drop every KV entry after the first `length` (the tree search times one step repeatedly)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]


@torch.inference_mode()
def prefill(base: nn.Module, cache, prompt: torch.Tensor, feature_layers=(), temperature: float = 0.0, generator=None) -> Verified:
    """prompt: [T] on the base's device -> Verified(start 0, the prompt, the first new token)."""
    positions = torch.arange(len(prompt), device=prompt.device)[None]
    hidden, features = run_decoder(base.get_decoder(), prompt[None], positions, cache, feature_layers=feature_layers)
    first = sample(lm_head_of(base)(hidden[0, -1]), temperature, generator)
    return Verified(0, prompt.tolist(), int(first), hidden[0], features[0] if features is not None else None)


@torch.inference_mode()
def verify_step(
    base: nn.Module,
    cache,
    draft: DraftTree,
    feature_layers=(),
    temperature: float = 0.0,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    speculative: bool = False,
) -> Verified:
    """Verify `draft` (root = the last verified token, not yet in `cache`) after the cached prefix.

    temperature 0: greedy, lossless (the emitted tokens are the base's greedy tokens).
    temperature > 0: typical acceptance (threshold min(epsilon, alpha * exp(-entropy))) and a
    sampled next token; with `speculative`, speculative sampling instead (lossless in
    distribution; the draft's nodes count as deterministic choices, speculative_sampling.py).
    -> Verified for the root and the accepted candidates.
    """
    tokens = draft.tokens
    buffers = cached_tree_buffers(draft.parents, tokens.device)
    prefix_length = cache.get_seq_length()
    lm_head = lm_head_of(base)
    positions = (prefix_length + buffers.depths)[None]
    # One node sees the whole prefix anyway: no mask lets attention take its plain decode path.
    mask = verify_attention_mask(buffers, prefix_length, lm_head.weight.dtype) if draft.num_nodes > 1 else None
    hidden, features = run_decoder(base.get_decoder(), tokens[None], positions, cache, mask, feature_layers)
    hidden = hidden[0]  # [N, hidden]
    logits = lm_head(hidden)  # [N, V]

    if draft.num_nodes == 1:  # a plain step: nothing to accept and nothing to compact
        nodes = buffers.retrieve_indices[0, :1]
        next_token = sample(logits[0], temperature, generator)
    else:
        retrieve = buffers.retrieve_indices.clamp(min=0)  # [L, D + 1]; pads point at the root ...
        path_tokens = tokens[retrieve].masked_fill(buffers.retrieve_indices < 0, -1)  # ... and never match
        if temperature <= 0:
            choice = logits.argmax(dim=-1)  # [N] the base's own next token after each node
            path, accepted = best_path(accepted_lengths(path_tokens, choice[retrieve]))
        elif not speculative:
            path_logits = logits[retrieve]  # [L, D + 1, V]
            lengths = typical_accepted_lengths(path_tokens, path_logits, temperature, typical_epsilon, typical_alpha)
            path, accepted = typical_best_path(lengths, path_tokens, path_logits, temperature)
        if temperature > 0 and speculative:
            path_nodes, next_token = tree_accept(tokens, torch.tensor(draft.parents), target_distribution(logits, temperature), None, generator)
            nodes = torch.tensor(path_nodes, device=tokens.device)
        else:
            nodes = buffers.retrieve_indices[path, : accepted + 1]  # root first, increasing
            last = nodes[-1]
            next_token = choice[last] if temperature <= 0 else sample(logits[last], temperature, generator)
        keep_cache_entries(cache, prefix_length, nodes)
    return Verified(
        start=prefix_length,
        tokens=tokens[nodes].tolist(),
        next_token=int(next_token),
        hidden=hidden[nodes],
        features=features[0, nodes] if features is not None else None,
        nodes=nodes,
    )
