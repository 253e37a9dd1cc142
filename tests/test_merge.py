"""Merging the heads' draft tree with the lookup chains: hand-worked examples."""

import pytest

from medusaforge.decoding.tree import build_tree_buffers
from medusaforge.drafters.merge import accepted_source, chain_tree, merge_trees

# Heads (source 0): root 50; 11 and 12 under the root; 13 under 11.
HEAD_TOKENS, HEAD_PARENTS = [50, 11, 12, 13], [-1, 0, 0, 1]
# Lookup (source 1): the chain 50 -> 11 -> 14 -> 15, sharing the prefix 50 -> 11 with the heads.
LOOKUP_TOKENS, LOOKUP_PARENTS = [50, 11, 14, 15], [-1, 0, 1, 2]


def test_shared_prefix_is_one_node_and_each_node_knows_its_sources():
    merged = merge_trees([(HEAD_TOKENS, HEAD_PARENTS), (LOOKUP_TOKENS, LOOKUP_PARENTS)])
    # node:            0   1   2   3   4   5
    assert merged.tokens == [50, 11, 12, 13, 14, 15]
    assert merged.parents == [-1, 0, 0, 1, 1, 4]
    assert merged.sources == [0b11, 0b11, 0b01, 0b01, 0b10, 0b10]
    assert merged.num_nodes == 6  # 4 + 4 nodes, minus the shared root and the shared 11


def test_the_first_trees_nodes_keep_their_indices():
    merged = merge_trees([(HEAD_TOKENS, HEAD_PARENTS), (LOOKUP_TOKENS, LOOKUP_PARENTS)])
    assert merged.tokens[: len(HEAD_TOKENS)] == HEAD_TOKENS
    assert merged.parents[: len(HEAD_PARENTS)] == HEAD_PARENTS


def test_the_same_token_under_different_parents_stays_two_nodes():
    # 13 is a child of 11 in the heads' tree and a child of 12 in the lookup tree: not the same node.
    merged = merge_trees([(HEAD_TOKENS, HEAD_PARENTS), ([50, 12, 13], [-1, 0, 1])])
    assert merged.tokens == [50, 11, 12, 13, 13]
    assert merged.parents == [-1, 0, 0, 1, 2]
    assert merged.sources == [0b11, 0b01, 0b11, 0b01, 0b10]


def test_chain_tree_shares_the_common_prefix_of_chains():
    tokens, parents = chain_tree(7, [[1, 2, 3], [1, 2, 4], [5]])
    assert tokens == [7, 1, 2, 3, 4, 5]
    assert parents == [-1, 0, 1, 2, 2, 0]
    assert chain_tree(7, []) == ([7], [-1])


def test_accepted_source_names_the_path_not_just_its_last_node():
    merged = merge_trees([(HEAD_TOKENS, HEAD_PARENTS), (LOOKUP_TOKENS, LOOKUP_PARENTS)])
    names = ("heads", "lookup")
    assert accepted_source(merged.sources, [0], names) == "none"
    assert accepted_source(merged.sources, [0, 1], names) == "both"
    assert accepted_source(merged.sources, [0, 1, 3], names) == "heads"
    assert accepted_source(merged.sources, [0, 1, 4, 5], names) == "lookup"
    assert accepted_source([0b111, 0b101], [0, 1], ("a", "b", "c")) == "a+c"


def test_malformed_or_disagreeing_trees_are_refused():
    with pytest.raises(ValueError, match="root token"):
        merge_trees([(HEAD_TOKENS, HEAD_PARENTS), ([51, 11], [-1, 0])])
    with pytest.raises(ValueError, match="parent must come before its child"):
        merge_trees([([50, 11, 12], [-1, 2, 0])])
    with pytest.raises(ValueError, match="same"):
        merge_trees([([50, 11], [-1])])
    with pytest.raises(ValueError, match="node 0 must be the root"):
        merge_trees([([50, 11], [0, 0])])


def test_the_merged_trees_verify_buffers():
    merged = merge_trees([(HEAD_TOKENS, HEAD_PARENTS), (LOOKUP_TOKENS, LOOKUP_PARENTS)])
    buffers = build_tree_buffers(merged.parents)  # parents [-1, 0, 0, 1, 1, 4]
    # Positions after the prefix: the root at 0, 11 and 12 at 1, 13 and 14 at 2, 15 at 3.
    assert buffers.depths.tolist() == [0, 1, 1, 2, 2, 3]
    # Each node sees the root, its ancestors and itself; 14 and 15 (lookup) see 11 (shared), not 12.
    assert buffers.attention_mask.long().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ]
    # One row per leaf (12, 13, 15) in node order; the lookup path runs through the shared node 1.
    assert buffers.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 3, -1], [0, 1, 4, 5]]
