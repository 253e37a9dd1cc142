"""Merge draft trees from several sources into one tree that a single verify pass checks.

A draft tree is a list of nodes: `tokens[i]` and `parents[i]`, node 0 the root (the last verified
token, parent -1), every parent before its children. Two sources (the Medusa heads, the lookup
drafter) each propose a tree from the same root; merging them is inserting every path into one
trie, so a prefix both propose is one shared node and costs one verify slot, not two.

Each merged node keeps a bitmask of the sources that proposed it (bit s for source s), so after
verifying we know whether the accepted path came from one source, the other, or both.

Example, heads [root r; a under r; b under r; c under a], lookup chain r -> a -> d:
  merged  node: 0 r   1 a   2 b   3 c   4 d
        parent:  -1    0     0     1     1
       sources:  11   11    01    01    10    (bit 0 heads, bit 1 lookup)
The first tree's nodes keep their indices, so passing the heads first leaves the heads' nodes where
a fixed head tree would put them; the second tree's new nodes follow in its own order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class MergedTree:
    tokens: list[int]  # [N] token per node; node 0 is the root
    parents: list[int]  # [N] parent node index, -1 for the root; parents[i] < i
    sources: list[int]  # [N] bitmask of the sources that proposed the node (the root: all of them)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)


def chain_tree(root_token: int, chains: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Chains of tokens after `root_token` -> (tokens, parents) of the tree of their union."""
    tokens, parents = [int(root_token)], [-1]
    for chain in chains:
        parent = 0
        for token in chain:
            tokens.append(int(token))
            parents.append(parent)
            parent = len(tokens) - 1
    merged = merge_trees([(tokens, parents)])
    return merged.tokens, merged.parents


def merge_trees(trees: Sequence[tuple[Sequence[int], Sequence[int]]]) -> MergedTree:
    """Pure: [(tokens, parents) per source] -> their union, shared prefixes shared (see above).

    Raises ValueError if a tree is malformed (root not first, a parent after its child) or the
    trees disagree on the root token: they must all draft from the same verified position.
    """
    if not trees:
        raise ValueError("merge_trees: no trees to merge")
    root_token = int(trees[0][0][0]) if len(trees[0][0]) else None
    tokens: list[int] = [root_token]
    parents: list[int] = [-1]
    sources: list[int] = [(1 << len(trees)) - 1]
    children: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for source, (tree_tokens, tree_parents) in enumerate(trees):
        _check_tree(tree_tokens, tree_parents, source)
        if int(tree_tokens[0]) != root_token:
            raise ValueError(f"merge_trees: tree {source} drafts from root token {int(tree_tokens[0])}, tree 0 from {root_token}")
        merged_index = [0]  # this tree's node i -> merged node
        for i in range(1, len(tree_tokens)):
            key = (merged_index[int(tree_parents[i])], int(tree_tokens[i]))
            node = children.get(key)
            if node is None:
                node = len(tokens)
                children[key] = node
                tokens.append(key[1])
                parents.append(key[0])
                sources.append(0)
            sources[node] |= 1 << source
            merged_index.append(node)
    return MergedTree(tokens, parents, sources)


def _check_tree(tokens: Sequence[int], parents: Sequence[int], source: int) -> None:
    if len(tokens) == 0 or len(tokens) != len(parents):
        raise ValueError(f"merge_trees: tree {source} has {len(tokens)} tokens and {len(parents)} parents (need the same, root included)")
    if int(parents[0]) != -1:
        raise ValueError(f"merge_trees: tree {source} node 0 must be the root (parent -1), has parent {int(parents[0])}")
    for i in range(1, len(parents)):
        if not 0 <= int(parents[i]) < i:
            raise ValueError(f"merge_trees: tree {source} node {i} has parent {int(parents[i])}; a parent must come before its child")


def accepted_source(sources: Sequence[int], accepted_nodes: Sequence[int], names: Sequence[str]) -> str:
    """Which sources proposed the accepted path: the names of the deepest accepted node's bits
    joined by '+' (a node's bits are a subset of its parent's, so the deepest node's are the path's),
    "both" when there are two names and both did, "none" when no candidate was accepted.
    accepted_nodes: merged node indices root first, as verify returns them."""
    if len(accepted_nodes) <= 1:
        return "none"
    mask = sources[int(accepted_nodes[-1])]
    if len(names) == 2 and mask == 3:
        return "both"
    return "+".join(name for bit, name in enumerate(names) if mask >> bit & 1)
