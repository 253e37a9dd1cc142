import json

import pytest
import torch

from medusaforge.decoding.tree import build_tree_buffers, default_tree, load_tree, save_tree, verify_attention_mask
from medusaforge.drafters.medusa_proposer import normalise_paths, path_tree
from medusaforge.drafters.proposer import DraftTree


def test_buffers_from_parents_on_a_hand_worked_tree():
    # nodes: 0 root; 1, 2 under the root; 3, 4 under node 1; 5 under node 3
    buffers = build_tree_buffers((-1, 0, 0, 1, 1, 3))
    assert buffers.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert buffers.attention_mask.long().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]
    # leaves 2, 4, 5 (in node order), each path root -> leaf, padded with -1
    assert buffers.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert buffers.num_nodes == 6 and buffers.max_depth == 3


def test_root_only_tree_is_a_plain_step():
    buffers = build_tree_buffers((-1,))
    assert buffers.depths.tolist() == [0] and buffers.retrieve_indices.tolist() == [[0]]


@pytest.mark.parametrize("parents, message", [((), "root"), ((0, 0), "root"), ((-1, 1), "node 1 has parent 1"), ((-1, 0, 3, 0), "node 2")])
def test_bad_parents_are_refused(parents, message):
    with pytest.raises(ValueError, match=message):
        build_tree_buffers(parents)


def test_path_tree_keeps_a_parents_first_order_and_sorts_any_other():
    tree = path_tree([[0], [0, 0], [1], [0, 0, 0], [0, 1]])  # best first, parents first: kept
    assert tree.paths == [(0,), (0, 0), (1,), (0, 0, 0), (0, 1)]
    assert tree.parents == (-1, 0, 1, 0, 2, 1)
    assert tree.node_heads.tolist() == [0, 0, 1, 0, 2, 1] and tree.node_ranks.tolist() == [0, 0, 0, 1, 0, 1]
    assert tree.topk == 2 and tree.depth == 3
    # a child before its parent: the canonical (depth, path) order instead
    assert path_tree([[0, 0], [1], [0]]).paths == [(0,), (1,), (0, 0)]


def test_truncated_draft_is_still_a_tree():
    draft = DraftTree(torch.tensor([7, 10, 20, 11, 30]), (-1, 0, 1, 0, 2))
    cut = draft.truncated(3)
    assert cut.tokens.tolist() == [7, 10, 20] and cut.parents == (-1, 0, 1)
    build_tree_buffers(cut.parents)


def test_verify_mask_sees_prefix_and_ancestors():
    buffers = build_tree_buffers((-1, 0, 0))
    mask = verify_attention_mask(buffers, prefix_length=2, dtype=torch.float32)
    visible = (mask[0, 0] == 0).long().tolist()
    assert visible == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 1]]
    assert mask.min() == torch.finfo(torch.float32).min


@pytest.mark.parametrize(
    "paths, message",
    [([], "non-empty"), ([[0], [0]], "twice"), ([[0, 1]], "no parent"), ([[0], [-1]], "non-negative"), ([[]], "non-empty")],
)
def test_bad_trees_are_refused(paths, message):
    with pytest.raises(ValueError, match=message):
        normalise_paths(paths)


@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5])
def test_every_shipped_default_tree_uses_every_head(num_heads):
    tree = default_tree(num_heads)
    assert max(len(p) for p in tree) == num_heads  # bug: default_4heads.json was only 3 deep
    build_tree_buffers(path_tree(tree).parents)


def test_default_trees_for_fewer_heads_than_the_file_drop_deeper_paths():
    assert max(len(p) for p in default_tree(6)) == 5  # past 5 heads: the 5-head tree
    assert all(len(p) <= 2 for p in default_tree(2))


def test_tree_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "tree.json"
    save_tree([[0], [0, 0], [1]], path, num_nodes=3)
    assert json.loads(path.read_text())["num_nodes"] == 3
    assert load_tree(path) == [[0], [0, 0], [1]]  # best-first order kept
    save_tree([], tmp_path / "none.json", num_nodes=0)
    assert load_tree(tmp_path / "none.json") == []  # "no drafting"
    (tmp_path / "plain.json").write_text("[[0], [1]]")
    assert load_tree(tmp_path / "plain.json") == [[0], [1]]
    (tmp_path / "bad.json").write_text("[[0], [2, 1]]")
    with pytest.raises(ValueError, match="bad.json.*no parent"):
        load_tree(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[[0]")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tree(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError):
        load_tree(tmp_path / "missing.json")
