import json

import pytest
import torch

from medusaforge.decoding.tree import (
    build_tree_buffers,
    default_tree,
    expected_accept_length,
    grow_tree,
    load_tree,
    normalise_paths,
    save_tree,
    tree_tokens,
    verify_attention_mask,
)


def test_buffers_for_hand_worked_tree():
    # nodes: 0 root, 1 [0], 2 [1], 3 [0, 0], 4 [0, 1], 5 [0, 0, 0]  (given unsorted on purpose)
    buffers = build_tree_buffers([[0, 0], [1], [0], [0, 0, 0], [0, 1]])
    assert buffers.paths == [(0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert buffers.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert buffers.node_heads.tolist() == [-1, 0, 0, 1, 1, 2]
    assert buffers.node_ranks.tolist() == [0, 0, 1, 0, 1, 0]
    assert buffers.attention_mask.long().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]
    # leaves: [1], [0, 1], [0, 0, 0]  (in node order)
    assert buffers.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert buffers.topk == 2 and buffers.num_nodes == 6 and buffers.max_depth == 3


def test_tree_tokens_gathers_head_candidates():
    buffers = build_tree_buffers([[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    candidates = torch.tensor([[10, 11], [20, 21], [30, 31]])  # [num_heads, topk]
    assert tree_tokens(torch.tensor(7), candidates, buffers).tolist() == [7, 10, 11, 20, 21, 30]


def test_verify_mask_sees_prefix_and_ancestors():
    buffers = build_tree_buffers([[0], [1]])
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


def test_expected_accept_length_by_hand():
    accuracies = [[0.5, 0.2], [0.4]]
    # 1 + P([0]) + P([1]) + P([0,0]) = 1 + 0.5 + 0.2 + 0.5 * 0.4
    assert expected_accept_length([[0], [1], [0, 0]], accuracies) == pytest.approx(1.9)


def test_grow_tree_takes_best_products_and_keeps_parents():
    accuracies = [[0.6, 0.3, 0.05], [0.5, 0.1]]
    # candidates by product: [0] .6, [0,0] .3, [1] .3, [1,0] .15, [0,1] .06, [2] .05
    tree = grow_tree(accuracies, 4)
    assert sorted(map(tuple, tree)) == [(0,), (0, 0), (1,), (1, 0)]
    for size in range(1, 7):
        normalise_paths(grow_tree(accuracies, size))  # every prefix present


def test_shipped_default_trees_load_and_fit():
    for num_heads in range(1, 6):
        tree = default_tree(num_heads)
        assert max(len(p) for p in tree) <= num_heads
        build_tree_buffers(tree)


def test_tree_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "tree.json"
    save_tree([[0], [0, 0], [1]], path, num_nodes=3)
    assert json.loads(path.read_text())["num_nodes"] == 3
    assert load_tree(path) == [[0], [1], [0, 0]]
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


def test_tree_from_measured_rank_paths():
    from medusaforge.decoding.tree import expected_accept_length_from_frequencies, grow_tree_from_frequencies, path_frequencies

    # 4 calibration positions; -1 = the right token was not in that head's top-k
    rank_paths = torch.tensor([[0, 0], [0, 1], [1, 0], [-1, 0]])
    frequencies = path_frequencies(rank_paths)
    assert frequencies == {(0,): 0.5, (0, 0): 0.25, (0, 1): 0.25, (1,): 0.25, (1, 0): 0.25}
    tree = grow_tree_from_frequencies(frequencies, 3)
    assert tree == [[0], [1], [0, 0]]  # ties: shorter first, then lower ranks
    assert expected_accept_length_from_frequencies(tree, frequencies) == pytest.approx(2.0)
