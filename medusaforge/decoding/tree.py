"""Draft trees -> the buffers one verify forward pass needs, and tree files.

A draft tree is given by its parents (see drafters/proposer.py): node 0 is the root, parents[0] is
-1 and every other node's parent comes before it. From the parents alone follow:
  - depths: the root is 0, a child is its parent + 1; a node's position is prefix length + depth;
  - the attention mask: a node sees itself and its ancestors (and the cached prefix);
  - retrieve_indices: one row per leaf, the node indices root -> leaf, padded with -1.

Example, parents (-1, 0, 0, 1): nodes 1 and 2 follow the root, node 3 follows node 1
  attention (row sees column):   depths: [0, 1, 1, 2]
      0 1 2 3                    retrieve_indices (leaves 2 and 3, in node order):
  0   1 0 0 0                      [[0, 2, -1],
  1   1 1 0 0                       [0, 1, 3]]
  2   1 0 1 0
  3   1 1 0 1

Tree files hold Medusa path lists (`medusa_choices`, see drafters/medusa_proposer.py).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.drafters.medusa_proposer import normalise_paths
from medusaforge.files import atomic_write_text, read_json

TREES_DIR = Path(__file__).parent / "trees"  # shipped as package data


@dataclass(frozen=True)
class TreeBuffers:
    """Everything a verify step needs about a tree's shape. N nodes (root included), L leaves, D max depth."""

    attention_mask: torch.Tensor  # [N, N] bool, True where the row node may attend to the column node
    depths: torch.Tensor  # [N] long, 0 for the root
    retrieve_indices: torch.Tensor  # [L, D + 1] long, node indices root -> leaf, padded with -1

    @property
    def num_nodes(self) -> int:
        return self.depths.shape[0]

    @property
    def max_depth(self) -> int:
        return self.retrieve_indices.shape[1] - 1


def check_parents(parents) -> None:
    if len(parents) == 0 or parents[0] != -1:
        raise ValueError(f"draft tree parents {tuple(parents)!r}: node 0 must be the root, with parent -1")
    for node, parent in enumerate(parents[1:], start=1):
        if not 0 <= parent < node:
            raise ValueError(f"draft tree parents {tuple(parents)!r}: node {node} has parent {parent}; parents must come before their children")


def build_tree_buffers(parents) -> TreeBuffers:
    """Pure: parents (see the module docstring's worked example) -> TreeBuffers on the CPU."""
    parents = [int(p) for p in parents]
    check_parents(parents)
    num_nodes = len(parents)
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    depths = [0] * num_nodes
    mask[0, 0] = True
    for node in range(1, num_nodes):
        mask[node] = mask[parents[node]]
        mask[node, node] = True
        depths[node] = depths[parents[node]] + 1
    has_child = set(parents[1:])
    leaves = [node for node in range(num_nodes) if node not in has_child]
    retrieve = torch.full((len(leaves), max(depths) + 1), -1, dtype=torch.long)
    for row, leaf in enumerate(leaves):
        node = leaf
        while node >= 0:
            retrieve[row, depths[node]] = node
            node = parents[node]
    return TreeBuffers(mask, torch.tensor(depths), retrieve)


@functools.lru_cache(maxsize=64)
def cached_tree_buffers(parents: tuple[int, ...], device: torch.device) -> TreeBuffers:
    """build_tree_buffers on `device`, cached by shape: a fixed-shape draft builds its buffers once."""
    buffers = build_tree_buffers(parents)
    return TreeBuffers(*(t.to(device) for t in (buffers.attention_mask, buffers.depths, buffers.retrieve_indices)))


def verify_attention_mask(buffers: TreeBuffers, prefix_length: int, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, N, prefix_length + N] additive float mask: 0 where visible, dtype-min where not.
    The prefix (everything already in the KV cache) is visible to every node."""
    num_nodes = buffers.num_nodes
    device = buffers.attention_mask.device
    mask = torch.zeros(1, 1, num_nodes, prefix_length + num_nodes, dtype=dtype, device=device)
    mask[0, 0, :, prefix_length:].masked_fill_(~buffers.attention_mask, torch.finfo(dtype).min)
    return mask


# ---- tree files ------------------------------------------------------------------------------------

def default_tree(num_heads: int) -> list[list[int]]:
    """The tree shipped for `num_heads` heads (medusaforge/decoding/trees/default_{n}heads.json).
    Each file reaches depth n, so every head is used; past 5 heads the 5-head tree is used."""
    name = f"default_{min(max(num_heads, 1), 5)}heads.json"
    paths = _paths_from_json(json.loads((TREES_DIR / name).read_text()), name)
    return [p for p in paths if len(p) <= num_heads]


def load_tree(path: str | os.PathLike) -> list[list[int]]:
    """A tree from a JSON file: a list of paths or an object with a "paths" key.
    An empty list means `medusaforge tree` found that no draft beats plain decoding."""
    return _paths_from_json(read_json(path, "tree file"), str(path))


def load_tree_metadata(path: str | os.PathLike) -> dict:
    """The keys of a tree file other than "paths" ({} for a plain list)."""
    raw = json.loads(Path(path).read_text())
    return {k: v for k, v in raw.items() if k != "paths"} if isinstance(raw, dict) else {}


def _paths_from_json(raw, source: str) -> list[list[int]]:
    if isinstance(raw, dict):
        if "paths" not in raw:
            raise ValueError(f"{source}: a tree object needs a 'paths' key holding a list of paths")
        raw = raw["paths"]
    if raw == []:
        return []
    try:
        return [list(p) for p in normalise_paths(raw)]
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def save_tree(paths, path: str | os.PathLike, **metadata) -> None:
    """Write {**metadata, "paths": [...]} with one path per line, so diffs stay readable. The order
    of `paths` is kept (best first), so the decoder's shrinking keeps the best nodes."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in metadata.items()]
    rows = [f"    {json.dumps(list(p))}" for p in (normalise_paths(paths) if paths else [])]
    body = "\n" + ",\n".join(rows) + "\n  " if rows else ""
    atomic_write_text(path, "{\n" + "".join(line + "\n" for line in lines) + '  "paths": [' + body + "]\n}\n")
