"""Sparse candidate trees: paths -> the buffers one verify forward pass needs.

A tree is a list of paths, the `medusa_choices` format of Medusa, vLLM and TensorRT-LLM:
`[0]` is head 0's top-1 candidate, `[0, 1]` is head 1's rank-1 candidate under it, `[1, 0, 0]` is
head 2's top-1 under head 1's top-1 under head 0's rank-1 candidate. Depth d (1-based) is head d-1.

The verify pass feeds N = 1 + len(paths) nodes. Node 0 is the root: the token the base model itself
chose at the previous step, so it is always right. Nodes 1.. are the paths, sorted by (depth, path),
so a parent always comes before its children and the accepted path's node indices increase.

Example, paths [[0], [1], [0, 0]] -> nodes: 0 root, 1 [0], 2 [1], 3 [0, 0]
  attention (row sees column):   depths: [0, 1, 1, 2]
      0 1 2 3                    retrieve_indices (one row per leaf, padded with -1):
  0   1 0 0 0                      [[0, 1, 3],
  1   1 1 0 0                       [0, 2, -1]]
  2   1 0 1 0
  3   1 1 0 1
"""

from __future__ import annotations

import heapq
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

Path_ = tuple[int, ...]
TREES_DIR = Path(__file__).parent / "trees"  # shipped as package data


def normalise_paths(paths) -> list[Path_]:
    """Validate a tree and return its paths as tuples sorted by (depth, path).

    Raises ValueError for anything that is not a list of non-empty lists of non-negative ints,
    for duplicates, and for a path whose parent path is missing (the node would have no ancestor).
    """
    if not isinstance(paths, (list, tuple)) or not paths:
        raise ValueError("a tree must be a non-empty list of paths such as [[0], [1], [0, 0]]")
    out: set[Path_] = set()
    for path in paths:
        if not isinstance(path, (list, tuple)) or not path:
            raise ValueError(f"tree path {path!r} must be a non-empty list of ranks")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in path):
            raise ValueError(f"tree path {path!r}: ranks must be non-negative integers")
        path = tuple(path)
        if path in out:
            raise ValueError(f"tree path {list(path)} appears twice")
        out.add(path)
    for path in out:
        if len(path) > 1 and path[:-1] not in out:
            raise ValueError(f"tree path {list(path)} has no parent: add {list(path[:-1])}")
    return sorted(out, key=lambda p: (len(p), p))


@dataclass
class TreeBuffers:
    """Everything a verify step needs, as tensors. N nodes (root included), L leaves, D max depth."""

    paths: list[Path_]
    attention_mask: torch.Tensor  # [N, N] bool, True where the row node may attend to the column node
    depths: torch.Tensor  # [N] long, 0 for the root; position of a node = prefix length + depth
    node_heads: torch.Tensor  # [N] long, which head proposes the node (depth - 1); -1 for the root
    node_ranks: torch.Tensor  # [N] long, which of that head's top-k candidates; 0 for the root
    retrieve_indices: torch.Tensor  # [L, D + 1] long, node indices root -> leaf, padded with -1
    topk: int  # candidates needed per head: 1 + the largest rank in the tree

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return self.retrieve_indices.shape[1] - 1

    def to(self, device: torch.device | str) -> "TreeBuffers":
        moved = {name: getattr(self, name).to(device) for name in ("attention_mask", "depths", "node_heads", "node_ranks", "retrieve_indices")}
        return TreeBuffers(paths=self.paths, topk=self.topk, **moved)


def build_tree_buffers(paths) -> TreeBuffers:
    """Pure: a list of paths -> TreeBuffers (see the module docstring for a worked example)."""
    paths = normalise_paths(paths)
    index = {(): 0} | {path: i + 1 for i, path in enumerate(paths)}
    num_nodes = len(paths) + 1
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    for path, node in index.items():
        # A node sees itself and every ancestor: the prefixes of its path, the root's () included.
        for length in range(len(path) + 1):
            mask[node, index[path[:length]]] = True
    depths = torch.tensor([0] + [len(p) for p in paths])
    node_heads = depths - 1
    node_ranks = torch.tensor([0] + [p[-1] for p in paths])
    parents = {p[:-1] for p in paths}
    leaves = [p for p in paths if p not in parents]
    max_depth = max(len(p) for p in paths)
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        for length in range(len(leaf) + 1):
            retrieve[row, length] = index[leaf[:length]]
    topk = 1 + max(p[-1] for p in paths)
    return TreeBuffers(paths, mask, depths, node_heads, node_ranks, retrieve, topk)


def tree_tokens(root_token: torch.Tensor, candidates: torch.Tensor, buffers: TreeBuffers) -> torch.Tensor:
    """Gather the token of every node. root_token: [] long; candidates: [num_heads, topk] long,
    head k's candidates best first -> [N] long."""
    heads = buffers.node_heads.clamp(min=0)
    tokens = candidates[heads, buffers.node_ranks]
    tokens[0] = root_token
    return tokens


def verify_attention_mask(buffers: TreeBuffers, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, prefix_length + N] additive float mask: 0 where visible, dtype-min where not.
    The prefix (everything already in the KV cache) is visible to every node."""
    num_nodes = buffers.num_nodes
    device = buffers.attention_mask.device
    mask = torch.zeros(1, 1, num_nodes, prefix_length + num_nodes, dtype=dtype, device=device)
    mask[0, 0, :, prefix_length:].masked_fill_(~buffers.attention_mask, torch.finfo(dtype).min)
    return mask


# ---- growing trees from head accuracies ---------------------------------------------------------


def expected_accept_length(paths, accuracies) -> float:
    """Expected tokens per verify step, counting the base model's own token.

    accuracies[k][r] is the probability that head k's rank-r candidate is the right token. A node is
    accepted only if every node on its path is right, and at most one child of a node can be right
    (the candidates are distinct tokens), so the expected number of accepted candidates is the sum
    over nodes of the product of the accuracies along its path (heads treated as independent).
    """
    total = 1.0
    for path in normalise_paths(paths):
        probability = 1.0
        for depth, rank in enumerate(path):
            probability *= _accuracy(accuracies, depth, rank)
        total += probability
    return total


def _accuracy(accuracies, head: int, rank: int) -> float:
    if head >= len(accuracies) or rank >= len(accuracies[head]):
        return 0.0
    return float(accuracies[head][rank])


def grow_tree(accuracies, num_nodes: int) -> list[list[int]]:
    """The tree of `num_nodes` candidate nodes (root excluded) with the largest expected acceptance.

    Greedy by the product of the path's accuracies: a child's product never exceeds its parent's,
    so taking the best node on the frontier each time gives the best tree of every size (Medusa
    paper, section 3.3.1). The frontier of a node is its rank-0 child and its next-rank sibling.
    """
    num_heads = len(accuracies)
    frontier = [(-_accuracy(accuracies, 0, 0), (0,))]
    chosen: list[tuple[float, Path_]] = []
    while frontier and len(chosen) < num_nodes:
        negative, path = heapq.heappop(frontier)
        probability = -negative
        chosen.append((probability, path))
        parent_probability = probability / max(_accuracy(accuracies, len(path) - 1, path[-1]), 1e-30)
        sibling = path[:-1] + (path[-1] + 1,)
        if sibling[-1] < len(accuracies[len(path) - 1]):
            heapq.heappush(frontier, (-parent_probability * _accuracy(accuracies, len(path) - 1, sibling[-1]), sibling))
        if len(path) < num_heads:
            heapq.heappush(frontier, (-probability * _accuracy(accuracies, len(path), 0), path + (0,)))
    return [list(p) for p in normalise_paths([p for _, p in chosen])]


def path_frequencies(rank_paths: torch.Tensor) -> dict[Path_, float]:
    """rank_paths: [P, num_heads] long, at each calibration position the rank of the right token in
    each head's candidate list (any value >= max_rank or < 0 for "not in its top-k").
    -> {path: share of positions at which that node would be accepted}.

    A node is accepted exactly when every head on its path ranked the right token where the path
    says, so these shares are measured joint accuracies: no independence between heads assumed.
    """
    counts: dict[Path_, int] = {}
    for row in rank_paths.tolist():
        path: Path_ = ()
        for rank in row:
            if rank < 0:
                break
            path = path + (rank,)
            counts[path] = counts.get(path, 0) + 1
    total = max(len(rank_paths), 1)
    return {path: count / total for path, count in counts.items()}


def grow_tree_from_frequencies(frequencies: dict[Path_, float], num_nodes: int) -> list[list[int]]:
    """The `num_nodes` most often accepted nodes. A node is never accepted more often than its
    parent, and ties go to the shorter path, so every chosen node's parent is chosen too."""
    ranked = sorted(frequencies, key=lambda p: (-frequencies[p], len(p), p))
    return [list(p) for p in normalise_paths(ranked[:num_nodes])]


def expected_accept_length_from_frequencies(paths, frequencies: dict[Path_, float]) -> float:
    """Expected tokens per verify step (base token included) measured on calibration positions."""
    return 1.0 + sum(frequencies.get(p, 0.0) for p in normalise_paths(paths))


# ---- loading -------------------------------------------------------------------------------------


def default_tree(num_heads: int) -> list[list[int]]:
    """The tree shipped for `num_heads` heads (medusaforge/decoding/trees/default_{n}heads.json)."""
    name = f"default_{min(max(num_heads, 1), 5)}heads.json"
    text = (TREES_DIR / name).read_text()
    paths = _paths_from_json(json.loads(text), name)
    return [p for p in paths if len(p) <= num_heads]


def load_tree(path: str | os.PathLike) -> list[list[int]]:
    """A tree from a JSON file: either a list of paths or an object with a "paths" key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: tree file not found") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    return _paths_from_json(raw, str(path))


def _paths_from_json(raw, source: str) -> list[list[int]]:
    if isinstance(raw, dict):
        if "paths" not in raw:
            raise ValueError(f"{source}: a tree object needs a 'paths' key holding a list of paths")
        raw = raw["paths"]
    try:
        return [list(p) for p in normalise_paths(raw)]
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def save_tree(paths, path: str | os.PathLike, **metadata) -> None:
    """Write {**metadata, "paths": [...]} with one path per line, so diffs stay readable."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in metadata.items()]
    rows = [f"    {json.dumps(list(p))}" for p in normalise_paths(paths)]
    text = "{\n" + "".join(line + "\n" for line in lines) + '  "paths": [\n' + ",\n".join(rows) + "\n  ]\n}\n"
    Path(path).write_text(text)


def check_tree_fits(paths, num_heads: int, source: str = "tree") -> None:
    deepest = max(len(p) for p in paths)
    if deepest > num_heads:
        raise ValueError(f"{source}: has paths of depth {deepest} but the heads have only {num_heads} heads")
