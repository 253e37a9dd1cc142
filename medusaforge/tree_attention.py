"""Tree verification that computes every node bitwise as a one-token decoding step would.

Greedy Medusa decoding is lossless in exact arithmetic, but in bf16 a batched tree pass rounds
differently from `generate()`'s one-token steps: the linear layers on this CPU give the same bits
for a row whatever the batch, but attention does not. The one-token step calls SDPA with no mask
over the contiguous cached keys (grouped-query heads packed), while a tree pass needs a mask, so
it runs another kernel and accumulates over masked-out siblings. At near-ties of the top two
logits (one bf16 step apart) the argmax then flips, and the outputs part.

With `exact_tree_attention(base)`, the tree pass runs attention as one-token queries: each node's
query against the keys it may see (the prefix, then its ancestors, in order), gathered
contiguously and given to the model's own attention function exactly as the one-token step gives
them (nodes of one depth as one batch). Each node's attention output, and so its logits and its
KV entries, are then the bits `generate()` computes for that token. It costs one small attention
call per tree depth per layer, and the gathers.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch
from torch import nn


def _inner_attention(module: nn.Module, implementation: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        # Each architecture keeps its own eager function next to its attention class.
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _per_node_attention(implementation: str):
    def attention(module, query, key, value, attention_mask, tree_visible=None, **kwargs):
        inner = _inner_attention(module, implementation)
        if tree_visible is None:  # not a tree pass: exactly the model's own attention
            return inner(module, query, key, value, attention_mask, **kwargs)
        # query [1, heads, N, head_dim]; key, value [1, kv_heads, prefix + N, head_dim]. Nodes of one
        # depth see equally many keys, so they go as one batch of one-token queries.
        output = query.new_empty(1, query.shape[2], query.shape[1], value.shape[-1])
        for nodes, visible in tree_visible:
            node_query = query[0, :, nodes, None].transpose(0, 1).contiguous()  # [n, heads, 1, head_dim]
            node_key = key[0][:, visible].transpose(0, 1).contiguous()  # [n, kv_heads, keys, head_dim]
            node_value = value[0][:, visible].transpose(0, 1).contiguous()
            rows = inner(module, node_query, node_key, node_value, None, **kwargs)[0]  # [n, 1, heads, head_dim]
            output[0, nodes] = rows[:, 0]
        return output, None

    return attention


@contextmanager
def exact_tree_attention(base: nn.Module):
    """Within the block, the base's attention honours a `tree_visible` forward argument: one
    LongTensor per node of the key positions it sees. Without that argument nothing changes."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    original = base.config._attn_implementation
    if original != "eager" and original not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"exact tree attention: unknown attention implementation {original!r}")
    name = f"medusaforge_exact_{original}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _per_node_attention(original))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    base.config._attn_implementation = name
    try:
        yield
    finally:
        base.config._attn_implementation = original


def depth_groups(attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[N, N] tree attention mask -> per depth: (node indices [n], the nodes each sees, root to
    itself in increasing order [n, depth + 1])."""
    ancestors = [row.nonzero().flatten() for row in attention_mask]
    groups = []
    for depth in range(max(len(a) for a in ancestors)):
        nodes = [i for i, a in enumerate(ancestors) if len(a) == depth + 1]
        groups.append((torch.tensor(nodes, device=attention_mask.device), torch.stack([ancestors[i] for i in nodes])))
    return groups


def visible_positions(groups: list[tuple[torch.Tensor, torch.Tensor]], prefix_length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per depth group: (nodes, key positions [n, prefix_length + depth + 1]): the cached prefix,
    then the node's ancestors and itself at their place after the prefix, the key order of a
    one-token step."""
    visible = []
    for nodes, ancestors in groups:
        prefix = torch.arange(prefix_length, device=nodes.device).expand(len(nodes), prefix_length)
        visible.append((nodes, torch.cat([prefix, prefix_length + ancestors], dim=1)))
    return visible
