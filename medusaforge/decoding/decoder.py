"""Batch-1 Medusa decoding: one base forward over a candidate tree per step, lossless when greedy.

Each step (after a normal prefill that yields the first token, the tree's root):
  1. the heads read the hidden state of the last verified position and propose top-k tokens;
  2. the base model runs once over the tree (root + candidates); positions are prefix length +
     depth, and each node attends to the cached prefix, its ancestors and itself;
  3. the base's own choice after every node is compared with that node's children; the longest
     path whose candidates all match is accepted, and the base's choice after its last node is
     the next root, so every step emits accepted + 1 tokens;
  4. the KV entries of the accepted nodes are moved into place and the rest are cropped.

The cache is transformers' own DynamicCache, so any HF Llama/Qwen/Mistral-style decoder works.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from medusaforge.decoding.acceptance import accepted_lengths, best_path, sample, typical_accepted_lengths, typical_best_path
from medusaforge.models import lm_head_of
from medusaforge.decoding.tree import TreeBuffers, build_tree_buffers, check_tree_fits, default_tree, tree_tokens, verify_attention_mask

# (hidden [hidden_size] of the last verified position, every token so far incl. the root) -> [num_heads, topk]
Propose = Callable[[torch.Tensor, list[int]], torch.Tensor]


@dataclass
class DecodeResult:
    tokens: list[int]  # new tokens only; ends with the EOS token if one stopped decoding
    accepted: list[int] = field(default_factory=list)  # candidates accepted at each verify step
    stopped_by: str = "length"  # "eos" or "length"

    @property
    def num_steps(self) -> int:
        return len(self.accepted)

    @property
    def accept_lengths(self) -> list[int]:
        """Tokens emitted per verify step, counting the base model's own token."""
        return [a + 1 for a in self.accepted]


# ---- base model plumbing ---------------------------------------------------------------------


def new_cache(base: nn.Module):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=base.config)
    except TypeError:  # older transformers without the config argument
        return DynamicCache()


def _cache_kwarg(decoder: nn.Module) -> str:
    # transformers 5 renamed past_key_values to cache; read the signature rather than the version.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def run_decoder(decoder: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache, attention_mask=None) -> torch.Tensor:
    """tokens, positions: [1, T] -> [1, T, hidden] final post-norm hidden states; appends T KV entries."""
    outputs = decoder(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=attention_mask,
        use_cache=True,
        **{_cache_kwarg(decoder): cache},
    )
    return outputs.last_hidden_state


def cache_length(cache) -> int:
    return cache.get_seq_length()


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


# ---- candidates from the heads ----------------------------------------------------------------


def head_candidates(heads: nn.Module, hidden: torch.Tensor, topk: int, num_heads: int) -> torch.Tensor:
    """hidden: [hidden_size] -> [num_heads, topk] token ids, best first.

    Only this one position's logits are computed, and only for the heads the tree uses: a
    full-vocabulary head reads as many bytes as a large share of the base model, so computing
    every head at every tree node would cost more than the verify pass itself.
    """
    weights = [heads.projection_weight(k) for k in range(num_heads)]
    hidden = hidden.to(weights[0].dtype)
    transformed = torch.stack([heads.transform(hidden, k) for k in range(num_heads)])  # [num_heads, hidden]
    if all(w is weights[0] for w in weights):
        # shared_lm_head: one matmul reads the projection once for every head.
        logits = F.linear(transformed, weights[0])
    else:
        logits = torch.stack([F.linear(transformed[k], weights[k]) for k in range(num_heads)])
    candidates = logits.topk(topk, dim=-1).indices  # [num_heads, topk]
    if heads.token_map is not None:  # truncated head vocabulary -> full vocabulary ids
        candidates = heads.token_map[candidates]
    return candidates


def prepare_heads(heads: nn.Module, base: nn.Module) -> nn.Module:
    """Put heads on the base's device and dtype, in eval mode, so the step does no conversions."""
    weight = lm_head_of(base).weight
    heads.to(device=weight.device, dtype=weight.dtype).eval()
    if heads.config.shared_lm_head:
        heads.init_from_base(weight)
    return heads


# ---- the decoder -----------------------------------------------------------------------------


@torch.inference_mode()
def medusa_generate(
    base: nn.Module,
    heads: nn.Module | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    tree: list[list[int]] | TreeBuffers | None = None,
    temperature: float = 0.0,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    propose: Propose | None = None,
) -> DecodeResult:
    """Generate up to `max_new_tokens` after `input_ids` ([T] or [1, T]).

    temperature 0 is greedy and lossless: the tokens equal `base.generate(do_sample=False)`'s.
    temperature > 0 uses typical acceptance (threshold min(epsilon, alpha * exp(-entropy))).
    `propose` replaces the heads as the source of candidates (tests use an oracle).
    """
    eos = set(int(t) for t in eos_token_ids)
    device = lm_head_of(base).weight.device
    prompt = input_ids.reshape(-1).to(device)
    if max_new_tokens <= 0:
        return DecodeResult(tokens=[])
    num_heads = heads.num_heads if heads is not None else None
    if tree is None:
        if heads is None:
            raise ValueError("medusa_generate: pass a tree when decoding without heads")
        tree = default_tree(heads.num_heads)
    buffers = tree if isinstance(tree, TreeBuffers) else build_tree_buffers(tree)
    if num_heads is not None:
        check_tree_fits(buffers.paths, num_heads)
    buffers = buffers.to(device)
    oracle = propose is not None  # only a custom proposer needs the token history
    if propose is None:
        propose = lambda hidden, _: head_candidates(heads, hidden, buffers.topk, buffers.max_depth)  # noqa: E731

    decoder = base.get_decoder()
    lm_head = lm_head_of(base)
    dtype = lm_head.weight.dtype
    retrieve = buffers.retrieve_indices.clamp(min=0)  # [L, D + 1]; pads point at the root ...
    padding = buffers.retrieve_indices < 0  # ... and are masked to token -1, which never matches
    cache = new_cache(base)

    hidden = run_decoder(decoder, prompt[None], torch.arange(len(prompt), device=device)[None], cache)[0, -1]
    root = sample(lm_head(hidden), temperature, generator)
    result = DecodeResult(tokens=[int(root)])
    if int(root) in eos:
        result.stopped_by = "eos"
        return result

    while len(result.tokens) < max_new_tokens:
        prefix_length = cache_length(cache)
        candidates = propose(hidden, prompt.tolist() + result.tokens if oracle else [])
        tokens = tree_tokens(root, candidates.to(device), buffers)  # [N]
        positions = (prefix_length + buffers.depths)[None]
        mask = verify_attention_mask(buffers, prefix_length, dtype)
        tree_hidden = run_decoder(decoder, tokens[None], positions, cache, mask)[0]  # [N, hidden]
        logits = lm_head(tree_hidden)  # [N, V]

        path_tokens = tokens[retrieve].masked_fill(padding, -1)  # [L, D + 1]
        if temperature <= 0:
            choice = logits.argmax(dim=-1)  # [N] the base's own next token after each node
            path, accepted = best_path(accepted_lengths(path_tokens, choice[retrieve]))
        else:
            path_logits = logits[retrieve]  # [L, D + 1, V]
            lengths = typical_accepted_lengths(path_tokens, path_logits, temperature, typical_epsilon, typical_alpha)
            path, accepted = typical_best_path(lengths, path_tokens, path_logits, temperature)
        nodes = buffers.retrieve_indices[path, : accepted + 1]  # root first, increasing
        last = nodes[-1]
        root = choice[last] if temperature <= 0 else sample(logits[last], temperature, generator)
        keep_cache_entries(cache, prefix_length, nodes)
        hidden = tree_hidden[last]
        result.accepted.append(accepted)

        for token in tokens[nodes[1:]].tolist() + [int(root)]:
            result.tokens.append(token)
            if token in eos:
                result.stopped_by = "eos"
                return result
            if len(result.tokens) >= max_new_tokens:
                return result
    return result
