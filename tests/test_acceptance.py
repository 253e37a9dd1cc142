import torch

from medusaforge.decoding.acceptance import (
    accepted_lengths,
    best_path,
    typical_accepted_lengths,
    typical_best_path,
    typical_threshold,
)


def one_hot_logits(choices, vocab=8):
    """[L, D+1] chosen tokens -> [L, D+1, vocab] logits whose argmax is that token."""
    return torch.nn.functional.one_hot(torch.tensor(choices), vocab).float() * 5.0


def test_greedy_counts_matching_prefix_only():
    # path tokens (root first) and what the base emits after each node
    path_tokens = torch.tensor([[1, 2, 3, 4], [1, 2, 5, -1], [1, 6, -1, -1]])
    base_choice = torch.tensor([[2, 3, 7, 0], [2, 3, 0, 0], [2, 0, 0, 0]])
    assert accepted_lengths(path_tokens, base_choice).tolist() == [2, 1, 0]
    # a later match after a miss does not count
    assert accepted_lengths(torch.tensor([[1, 9, 3]]), torch.tensor([[2, 3, 0]])).tolist() == [0]


def test_greedy_accept_on_hand_made_logits():
    path_tokens = torch.tensor([[1, 2, 3], [1, 4, -1]])
    logits = one_hot_logits([[4, 3, 0], [4, 5, 0]])
    # As the decoder does it: the base's argmax after each node, then the longest matching path.
    choice = logits.argmax(dim=-1)
    path, accepted = best_path(accepted_lengths(path_tokens, choice))
    assert (path, accepted) == (1, 1)
    assert choice[path, accepted].item() == 5  # the base's own next token after the accepted node


def test_padding_never_matches():
    # -1 pads must not match a base choice, even a base choice of token 0 after a padded node
    assert accepted_lengths(torch.tensor([[1, 0, -1]]), torch.tensor([[0, 0, 0]])).tolist() == [1]


def test_best_path_prefers_first_on_ties():
    assert best_path(torch.tensor([1, 3, 3, 0])) == (1, 3)


def test_typical_threshold_is_epsilon_when_unsure_and_smaller_when_sure():
    uniform = torch.zeros(1000)
    assert typical_threshold(uniform, 1.0, epsilon=0.09, alpha=0.3).item() < 0.09  # exp(-log 1000) * .3
    peaked = torch.tensor([20.0, 0, 0, 0])
    assert abs(typical_threshold(peaked, 1.0, epsilon=0.09, alpha=0.3).item() - 0.09) < 1e-6


def test_typical_acceptance_on_hand_made_logits():
    # after the root the base puts 0.9 on token 2; after node 1 it is uniform over 4 tokens
    root_logits = torch.log(torch.tensor([0.025, 0.025, 0.9, 0.05]))
    uniform = torch.zeros(4)
    path_tokens = torch.tensor([[0, 2, 3], [0, 3, -1]])
    path_logits = torch.stack([torch.stack([root_logits, uniform, uniform]), torch.stack([root_logits, uniform, uniform])])
    lengths = typical_accepted_lengths(path_tokens, path_logits, temperature=1.0, epsilon=0.3, alpha=0.3)
    # path 0: p(2)=0.9 > thr; then p(3)=0.25 vs min(0.3, 0.3*exp(-ln4)=0.075) -> accepted
    # path 1: p(3)=0.05 < min(0.3, 0.3 * exp(-H)) with H ~ 0.4 -> 0.2
    assert lengths.tolist() == [2, 0]
    assert typical_best_path(lengths, path_tokens, path_logits, 1.0) == (0, 2)
