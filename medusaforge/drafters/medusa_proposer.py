"""Medusa heads as a proposer: top-k candidates per head, laid out on a fixed path tree.

A path tree is a list of paths, the `medusa_choices` format of Medusa, vLLM and TensorRT-LLM:
`[0]` is head 0's top-1 candidate, `[0, 1]` is head 1's rank-1 candidate under it, `[1, 0, 0]` is
head 2's top-1 under head 1's top-1 under head 0's rank-1 candidate. Depth d (1-based) is head d-1.
Node 0 is the root; nodes 1.. are the paths in their given order when every path's parent comes
before it (Medusa's published trees and ours list the best nodes first, which adaptive drafting
relies on when it shrinks a draft), otherwise sorted by (depth, path).

Example, paths [[0], [1], [0, 0]] -> parents (-1, 0, 0, 1), node heads [-1, 0, 0, 1], ranks [0, 0, 1, 0].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from medusaforge.drafters.proposer import DraftTree, Verified
from medusaforge.models import lm_head_of

Path_ = tuple[int, ...]
# (hidden [hidden_size] of the last verified position, every token so far incl. the root) -> [num_heads, topk]
Candidates = Callable[[torch.Tensor, list[int]], torch.Tensor]


def normalise_paths(paths) -> list[Path_]:
    """Validate a tree and return its paths as tuples, parents first (see the module docstring).

    Raises ValueError for anything that is not a non-empty list of non-empty lists of non-negative
    ints, for duplicates, and for a path whose parent path is missing (it would have no ancestor).
    """
    if not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError("a tree must be a non-empty list of paths such as [[0], [1], [0, 0]]")
    seen: list[Path_] = []
    for path in paths:
        if not isinstance(path, (list, tuple)) or not path:
            raise ValueError(f"tree path {path!r} must be a non-empty list of ranks")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"tree path {path!r}: ranks must be non-negative integers")
        if tuple(path) in seen:
            raise ValueError(f"tree path {list(path)} appears twice")
        seen.append(tuple(path))
    present = set(seen)
    for path in seen:
        if len(path) > 1 and path[:-1] not in present:
            raise ValueError(f"tree path {list(path)} has no parent: add {list(path[:-1])}")
    done: set[Path_] = {()}
    for path in seen:
        if path[:-1] not in done:
            return sorted(seen, key=lambda p: (len(p), p))
        done.add(path)
    return seen


@dataclass(frozen=True)
class PathTree:
    """A path list as nodes. N = 1 + len(paths)."""

    paths: list[Path_]
    parents: tuple[int, ...]  # [N], -1 for the root
    node_heads: torch.Tensor  # [N] long, the head proposing each node (depth - 1); 0 for the root (unused)
    node_ranks: torch.Tensor  # [N] long, which of that head's top-k candidates; 0 for the root
    topk: int  # candidates needed per head: 1 + the largest rank in the tree
    depth: int  # heads needed: the longest path


def path_tree(paths) -> PathTree:
    """Pure: a list of paths -> PathTree (see the module docstring for an example)."""
    paths = normalise_paths(paths)
    index = {(): 0} | {path: i + 1 for i, path in enumerate(paths)}
    parents = (-1,) + tuple(index[p[:-1]] for p in paths)
    heads = torch.tensor([0] + [len(p) - 1 for p in paths])
    ranks = torch.tensor([0] + [p[-1] for p in paths])
    return PathTree(paths, parents, heads, ranks, 1 + max(p[-1] for p in paths), max(map(len, paths)))


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


class MedusaProposer:
    """Drafts the same path tree every step from the heads' top-k at the last verified position.

    `candidates` replaces the heads as the source of [num_heads, topk] candidates (tests use an
    oracle that knows the base's continuation); then `heads` may be None.
    """

    feature_layers: tuple[int, ...] = ()

    def __init__(self, heads: nn.Module | None, paths, candidates: Candidates | None = None) -> None:
        if heads is None and candidates is None:
            raise ValueError("MedusaProposer: give heads or a candidates function")
        self.tree = path_tree(paths)
        if heads is not None and self.tree.depth > heads.num_heads:
            raise ValueError(f"tree: has paths of depth {self.tree.depth} but the heads have only {heads.num_heads} heads")
        self.heads = heads
        self.candidates = candidates
        self._device: torch.device | None = None

    def update(self, verified: Verified) -> None:
        pass  # the heads read only the base's latest hidden state, given to propose

    def propose(self, tokens: list[int], verified: Verified) -> DraftTree:
        hidden = verified.hidden[-1]
        if self.candidates is not None:
            candidates = self.candidates(hidden, tokens).to(hidden.device)
        else:
            candidates = head_candidates(self.heads, hidden, self.tree.topk, self.tree.depth)
        if self._device != candidates.device:  # move the index tensors once, not every step
            self._device = candidates.device
            self._heads_index = self.tree.node_heads.to(candidates.device)
            self._ranks_index = self.tree.node_ranks.to(candidates.device)
        node_tokens = candidates[self._heads_index, self._ranks_index]  # [N]
        node_tokens[0] = tokens[-1]
        return DraftTree(node_tokens, self.tree.parents)
