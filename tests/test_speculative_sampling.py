"""Speculative sampling is lossless: the emitted tokens are distributed as the base samples them.

Checked two ways: exactly (enumerating every draw of the candidates and summing the acceptance
probabilities the module computes) and by sampling the whole procedure many times, with a
tolerance of 5 standard errors, which a rule that is off by a few percent fails.
"""

import itertools

import pytest
import torch

from medusaforge.decoding import speculative_sampling
from medusaforge.decoding.speculative_sampling import (
    acceptance_probability,
    chain_accept,
    residual_distribution,
    target_distribution,
    tree_accept,
)

P = torch.tensor([0.5, 0.3, 0.2])
Q = torch.tensor([0.2, 0.6, 0.2])


def test_hand_worked_acceptance_and_residual():
    # token 1: p = 0.3, q = 0.6 -> accepted half the time
    assert acceptance_probability(P, Q, 1).item() == pytest.approx(0.5)
    # token 0: p > q -> always accepted
    assert acceptance_probability(P, Q, 0).item() == 1.0
    # max(p - q, 0) = [0.3, 0, 0] -> all mass on token 0
    assert residual_distribution(P, Q).tolist() == pytest.approx([1.0, 0.0, 0.0])
    # deterministic candidate (one-hot q): accepted with p(x); residual is p without x
    one_hot = torch.tensor([0.0, 1.0, 0.0])
    assert acceptance_probability(P, one_hot, 1).item() == pytest.approx(0.3)
    assert residual_distribution(P, one_hot).tolist() == pytest.approx([0.5 / 0.7, 0.0, 0.2 / 0.7])
    # p == q: nothing left to add; p itself comes back
    assert residual_distribution(P, P).tolist() == pytest.approx(P.tolist())
    with pytest.raises(ValueError, match="draft probability 0"):
        acceptance_probability(P, torch.tensor([0.0, 0.5, 0.5]), 0)


def emitted_distribution(p, candidates, drafts):
    """Exact distribution of the token chosen at one node with the module's own pieces:
    try the siblings in order; each rejection replaces p by its residual."""
    out = torch.zeros_like(p)
    reach = 1.0  # probability that every earlier sibling was rejected
    for token, q in zip(candidates, drafts):
        accept = acceptance_probability(p, q, token)
        out[token] += reach * accept
        reach = reach * (1 - accept)
        p = residual_distribution(p, q)
    return out + reach * p


def test_siblings_drawn_from_q_are_lossless_exactly():
    # Two siblings drawn independently from q; sum over all 9 draws weighted by their probability.
    total = torch.zeros(3)
    for x1, x2 in itertools.product(range(3), repeat=2):
        total += Q[x1] * Q[x2] * emitted_distribution(P, [x1, x2], [Q, Q])
    assert total.tolist() == pytest.approx(P.tolist(), abs=1e-6)


def test_deterministic_siblings_are_lossless_exactly():
    # EAGLE-2's top-k children: fixed distinct tokens, each a one-hot "draw".
    eye = torch.eye(3)
    for candidates in ([1], [1, 2], [2, 0, 1]):
        got = emitted_distribution(P, candidates, [eye[t] for t in candidates])
        assert got.tolist() == pytest.approx(P.tolist(), abs=1e-6)


# ---- the whole procedure, sampled ---------------------------------------------------------------

# A Markov "base" and "draft": the distribution of the next token given the previous one.
BASE = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
DRAFT = torch.tensor([[0.3, 0.5, 0.2], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
SAMPLES = 12000


def assert_joint_matches(counts: torch.Tensor, start: int):
    expected = BASE[start][:, None] * BASE  # p(y1) p(y2 | y1)
    observed = counts / counts.sum()
    tolerance = 5 * torch.sqrt(expected * (1 - expected) / SAMPLES)
    assert ((observed - expected).abs() <= tolerance).all(), (observed, expected)


def chain_pair_counts(generator: torch.Generator) -> torch.Tensor:
    """[3, 3] counts of the first two tokens emitted after context token 0 by `chain_accept` with
    two drafts sampled from DRAFT per step, over SAMPLES runs."""
    counts = torch.zeros(3, 3)
    for _ in range(SAMPLES):
        emitted = []
        last = 0
        while len(emitted) < 2:
            x1 = int(torch.multinomial(DRAFT[last], 1, generator=generator))
            x2 = int(torch.multinomial(DRAFT[x1], 1, generator=generator))
            drafts = torch.tensor([x1, x2])
            target = torch.stack([BASE[last], BASE[x1], BASE[x2]])
            accepted, token = chain_accept(drafts, target, torch.stack([DRAFT[last], DRAFT[x1]]), generator)
            emitted += drafts[:accepted].tolist() + [token]
            last = emitted[-1]
        counts[emitted[0], emitted[1]] += 1
    return counts


def tree_pair_counts(generator: torch.Generator) -> torch.Tensor:
    """[3, 3] counts of the first two tokens emitted after context token 2 by `tree_accept` over a
    fixed tree: root with children 1 and 0; child 1 with children 2 and 0 (EAGLE-2 shaped, one-hot
    drafts), over SAMPLES runs."""
    tokens = torch.tensor([2, 1, 0, 2, 0])
    parents = torch.tensor([-1, 0, 0, 1, 1])
    target = torch.stack([BASE[t] for t in tokens.tolist()])
    counts = torch.zeros(3, 3)
    for _ in range(SAMPLES):
        path, token = tree_accept(tokens, parents, target, None, generator)
        emitted = tokens[path[1:]].tolist() + [token]
        if len(emitted) < 2:  # one more plain base sample gives the second token
            emitted.append(int(torch.multinomial(BASE[emitted[0]], 1, generator=generator)))
        counts[emitted[0], emitted[1]] += 1
    return counts


def test_chain_with_sampled_drafts_is_lossless():
    assert_joint_matches(chain_pair_counts(torch.Generator().manual_seed(0)), 0)


def test_tree_with_deterministic_children_is_lossless():
    assert_joint_matches(tree_pair_counts(torch.Generator().manual_seed(1)), 2)


@pytest.mark.parametrize("procedure, start", [(chain_pair_counts, 0), (tree_pair_counts, 2)], ids=["chain", "tree"])
def test_a_lossy_rule_is_caught(procedure, start, monkeypatch):
    # Accepting a candidate outright whenever p(x) > 0.25 (a typical-acceptance-like rule) is not
    # lossless. Plugged into the product's own acceptance path (the module function that
    # choose_among_siblings calls), the sampled check the lossless tests pass must fail on it.
    lossless = speculative_sampling.acceptance_probability

    def accept_when_likely(p, q, token):
        return torch.ones(()) if p[token] > 0.25 else lossless(p, q, token)

    monkeypatch.setattr(speculative_sampling, "acceptance_probability", accept_when_likely)
    counts = procedure(torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_joint_matches(counts, start)


def test_target_distribution_needs_positive_temperature():
    logits = torch.tensor([1.0, 2.0, 3.0])
    assert target_distribution(logits, 1.0).tolist() == pytest.approx(torch.softmax(logits, -1).tolist())
    assert target_distribution(logits, 0.5).tolist() == pytest.approx(torch.softmax(logits * 2, -1).tolist())
    with pytest.raises(ValueError, match="temperature > 0"):
        target_distribution(logits, 0.0)
