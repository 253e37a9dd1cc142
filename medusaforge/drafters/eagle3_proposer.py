"""EAGLE-3 as a proposer: the draft layer grows a dynamic tree, most confident nodes first (EAGLE-2).

The draft keeps its own KV cache (drafters/eagle3.py). Its entry at position p is the pair
(fused base feature at p, embedding of token p+1), so after the base verifies positions
start .. start+n-1 and chooses the next root, `update` appends exactly those n entries, computed
from the base's own features, and nothing else: the cache then equals one built token by token
over the verified text. The output hidden state at the last entry predicts the token after the root.

`propose` grows the tree from there, one draft step per depth:
  depth 1: the top-k draft tokens after the root, each scored by its draft log-probability;
  depth d+1: the k best-scored nodes of depth d are run through the draft layer together (each
    attends to the verified entries, its own ancestors and itself; it reads its parent's output
    hidden state and sits at position root + d) and each gets its top-k children, scored by the
    cumulative log-probability of its path;
  finally the `num_nodes` best-scored nodes of all depths form the draft. A child never scores
  above its parent, so the chosen nodes always include their ancestors, and ordering them best
  first puts every parent before its children (ties: shallower first).
The tree entries added while drafting are dropped at the next `update` (the accepted tokens'
entries are recomputed from the base's features there, as EAGLE does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medusaforge.drafters.proposer import DraftTree, Verified


@dataclass(frozen=True)
class DynamicTree:
    """EAGLE-2's tree settings: `topk` children per expanded node (and nodes expanded per depth),
    `depth` draft steps at most, `num_nodes` candidate nodes in the verified tree (root not counted)."""

    topk: int = 4
    depth: int = 5
    num_nodes: int = 16

    def __post_init__(self) -> None:
        for name in ("topk", "depth", "num_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"EAGLE tree: {name} must be at least 1, got {getattr(self, name)}")


@dataclass
class _Node:
    draft_id: int  # token in the draft vocabulary
    parent: int  # index into the node list, -1 for a child of the root
    score: float  # cumulative draft log-probability of the path root -> this node
    depth: int  # 1 for children of the root
    hidden: torch.Tensor  # [H] output hidden of the step that proposed this node (its parent's)
    slot: int = -1  # its draft KV cache slot once expanded


def prepare_draft(draft: nn.Module, base: nn.Module) -> nn.Module:
    """The draft on the base's device and dtype, in eval mode, so a step does no conversions."""
    weight = base.get_input_embeddings().weight
    draft.to(device=weight.device, dtype=weight.dtype).eval()
    # .to(dtype) casts the rotary frequencies too. HF keeps them float32 in a bf16 model, as training
    # computed them: in bf16 the angle at position 500 is off by up to ~2 radians. Recompute them.
    fresh = type(draft.rotary_emb)(draft.config)
    for name, buffer in fresh.named_buffers():
        setattr(draft.rotary_emb, name, buffer.to(weight.device))
    return draft


class Eagle3Proposer:
    """See the module docstring. `draft` is a drafters.eagle3.Eagle3Draft on the base's device."""

    def __init__(self, draft: nn.Module, tree: DynamicTree | None = None) -> None:
        self.draft = draft
        self.tree = tree or DynamicTree()
        self.feature_layers = tuple(draft.feature_layers)
        self.cache = None
        self.committed = 0  # cache entries computed from the base's features (one per verified position)
        self.last_hidden: torch.Tensor | None = None  # [H] draft output at the last verified position
        self.pending: list = []  # (next tokens, base features, positions) of verified steps not yet read

    @torch.inference_mode()
    def update(self, verified: Verified) -> None:
        """Queue the verified positions' base features; the draft reads them at the next propose.
        Steps that do not draft (adaptive drafting turned it off) then cost the draft nothing, and
        several queued steps are read in one draft forward."""
        from medusaforge.drafters.eagle3 import DraftKVCache

        if verified.features is None:
            raise ValueError("Eagle3Proposer: the verify step returned no base features (feature_layers not passed)")
        if verified.start == 0:
            self.cache, self.committed, self.pending = DraftKVCache(), 0, []
        queued = self.committed + sum(tokens.shape[1] for tokens, _, _ in self.pending)
        if queued != verified.start:
            raise RuntimeError(f"draft cache holds {queued} positions but the base verified from {verified.start}")
        device = verified.features.device
        next_tokens = torch.tensor(verified.tokens[1:] + [verified.next_token], device=device)[None]  # [1, n]
        positions = torch.arange(verified.start, verified.start + len(verified.tokens), device=device)[None]
        self.pending.append((next_tokens, verified.features.flatten(1)[None], positions))  # features [1, n, 3H]

    def catch_up(self) -> None:
        """Run the draft over every queued verified position, extending its cache."""
        self.cache.crop(self.committed)  # the previous tree's entries
        if not self.pending:
            return
        next_tokens, features, positions = (torch.cat(parts, dim=1) for parts in zip(*self.pending))
        out, self.cache = self.draft.step(next_tokens, self.draft.fuse(features), positions, self.cache)
        self.committed, self.pending = len(self.cache), []
        self.last_hidden = out[0, -1]

    @torch.inference_mode()
    def propose(self, tokens: list[int], verified: Verified) -> DraftTree:
        self.catch_up()
        k = min(self.tree.topk, self.draft.config.draft_vocab_size)
        root_position = self.committed - 1  # the entry (feature at p, root) sits at p = committed - 1
        nodes = self._children(self.last_hidden[None], [-1], [0.0], [0], k)
        frontier = list(range(len(nodes)))
        for depth in range(1, self.tree.depth):
            expand = sorted(frontier, key=lambda i: -nodes[i].score)[:k]
            outputs = self._expand(nodes, expand, root_position + depth)
            frontier = [len(nodes) + i for i in range(len(expand) * k)]
            nodes += self._children(outputs, expand, [nodes[i].score for i in expand], [depth] * len(expand), k)
        return self._select(nodes, tokens[-1])

    def _children(self, hiddens: torch.Tensor, parents: list[int], scores: list[float], depths: list[int], k: int) -> list[_Node]:
        """hiddens [m, H]: the output of the step run for each parent -> its top-k children."""
        logprobs = torch.log_softmax(self.draft.logits(hiddens).float(), dim=-1)  # [m, draft_vocab]
        top = logprobs.topk(k, dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()  # note: a host sync per depth
        return [
            _Node(indices[j][r], parents[j], scores[j] + values[j][r], depths[j] + 1, hiddens[j])
            for j in range(len(parents))
            for r in range(k)
        ]

    def _expand(self, nodes: list[_Node], expand: list[int], position: int) -> torch.Tensor:
        """Run the draft on the nodes `expand` (all at one depth, hence one position). -> [m, H]."""
        device = self.last_hidden.device
        draft_ids = torch.tensor([nodes[i].draft_id for i in expand], device=device)
        input_ids = self.draft.to_target(draft_ids)[None]  # [1, m]
        hidden = torch.stack([nodes[i].hidden for i in expand])[None]  # [1, m, H]
        past = len(self.cache)
        mask = torch.zeros(1, len(expand), past + len(expand), dtype=torch.bool, device=device)
        mask[:, :, : self.committed] = True
        for row, index in enumerate(expand):
            nodes[index].slot = past + row
            ancestor = nodes[index].parent
            while ancestor >= 0:
                mask[0, row, nodes[ancestor].slot] = True
                ancestor = nodes[ancestor].parent
            mask[0, row, past + row] = True
        positions = torch.full((1, len(expand)), position, device=device)
        out, self.cache = self.draft.step(input_ids, hidden, positions, self.cache, attention_mask=mask)
        return out[0]

    def _select(self, nodes: list[_Node], root: int) -> DraftTree:
        """The best `num_nodes` nodes, best first (ties: shallower first), as a DraftTree."""
        order = sorted(range(len(nodes)), key=lambda i: (-nodes[i].score, nodes[i].depth, i))[: self.tree.num_nodes]
        position = {index: n + 1 for n, index in enumerate(order)}
        parents = (-1,) + tuple(0 if nodes[i].parent < 0 else position[nodes[i].parent] for i in order)
        device = self.last_hidden.device
        draft_ids = torch.tensor([nodes[i].draft_id for i in order], dtype=torch.long, device=device)
        tokens = torch.cat([torch.tensor([root], device=device), self.draft.to_target(draft_ids)])
        return DraftTree(tokens, parents)
