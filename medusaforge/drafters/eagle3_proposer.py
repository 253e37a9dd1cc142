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
        """The tree of the module docstring. Every depth stays on the device (scores, draft ids,
        parents and attention masks are tensors); the one host sync is the parents tuple at the end."""
        self.catch_up()
        k = min(self.tree.topk, self.draft.config.draft_vocab_size)
        root_position = self.committed - 1  # the entry (feature at p, root) sits at p = committed - 1
        device = self.last_hidden.device
        # Nodes are numbered depth by depth, each depth's block in the order it was drafted.
        # outputs [m, H]: the draft outputs the newest block was proposed from; block node j came from
        # row j // k. ancestors [m * k, T]: the tree cache slots each newest node may attend to.
        outputs = self.last_hidden[None]
        scores, draft_ids = self._children(outputs, torch.zeros(1, dtype=torch.float64, device=device), k)
        ancestors = torch.zeros(k, 0, dtype=torch.bool, device=device)
        all_scores, all_ids, all_parents = [scores], [draft_ids], [torch.full((k,), -1, device=device)]
        first = 0  # number of the newest block's first node
        for depth in range(1, self.tree.depth):
            # The k best of the newest depth, best first; a stable sort breaks ties by node number.
            expand = torch.sort(-scores, stable=True).indices[:k]  # [m]
            rows = torch.cat([ancestors[expand], torch.eye(len(expand), dtype=torch.bool, device=device)], dim=1)
            outputs = self._expand(draft_ids[expand], outputs[expand // k], rows, root_position + depth)
            all_parents.append((first + expand).repeat_interleave(k))
            first += len(scores)
            scores, draft_ids = self._children(outputs, scores[expand], k)
            ancestors = rows.repeat_interleave(k, dim=0)  # a child sees what its parent saw, and its parent
            all_scores.append(scores)
            all_ids.append(draft_ids)
        return self._select(torch.cat(all_scores), torch.cat(all_ids), torch.cat(all_parents), tokens[-1])

    def _children(self, outputs: torch.Tensor, parent_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """outputs [m, H]: the draft step run for each parent; parent_scores [m] float64 ->
        (scores [m * k] float64, draft ids [m * k]): each parent's top-k children, parent by parent.
        Scores add in float64, as the Python floats of the earlier list version did: same sums, same order."""
        logprobs = torch.log_softmax(self.draft.logits(outputs).float(), dim=-1)  # [m, draft_vocab]
        top = logprobs.topk(k, dim=-1)
        return (parent_scores[:, None] + top.values.double()).flatten(), top.indices.flatten()

    def _expand(self, draft_ids: torch.Tensor, hidden: torch.Tensor, tree_mask: torch.Tensor, position: int) -> torch.Tensor:
        """Run the draft on m nodes of one depth (hence one position). draft_ids [m]; hidden [m, H]
        (each node's parent's output); tree_mask [m, T + m]: the tree cache slots each may attend to,
        its own new slot included. -> [m, H]."""
        m = len(draft_ids)
        verified = torch.ones(m, self.committed, dtype=torch.bool, device=hidden.device)
        mask = torch.cat([verified, tree_mask], dim=1)[None]  # [1, m, committed + T + m]
        positions = torch.full((1, m), position, device=hidden.device)
        out, self.cache = self.draft.step(self.draft.to_target(draft_ids)[None], hidden[None], positions, self.cache, attention_mask=mask)
        return out[0]

    def _select(self, scores: torch.Tensor, draft_ids: torch.Tensor, parents: torch.Tensor, root: int) -> DraftTree:
        """The best `num_nodes` nodes, best first, as a DraftTree. Node numbers grow with depth, so a
        stable sort on the score breaks ties shallower first, then in drafting order."""
        order = torch.sort(-scores, stable=True).indices[: self.tree.num_nodes]  # [n]
        place = torch.zeros(len(scores) + 1, dtype=torch.long, device=scores.device)
        place[order] = torch.arange(1, len(order) + 1, device=scores.device)  # node -> its place in the draft
        chosen = parents[order]
        tree_parents = torch.where(chosen < 0, 0, place[chosen])
        tokens = torch.cat([torch.tensor([root], device=scores.device), self.draft.to_target(draft_ids[order])])
        return DraftTree(tokens, (-1,) + tuple(tree_parents.tolist()))  # note: the step's one host sync
