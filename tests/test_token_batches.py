"""The token-budget batcher (training/batches.py) on a hand-worked example and on random lengths:
every training conversation lands in exactly one micro-batch per epoch, and every batch's padded
size (longest x count) stays within the budget."""

import random

import pytest

from medusaforge.training.batches import count_batches, micro_batch_plan, steps_for_epochs, token_budget_batches


def test_hand_worked_grouping_by_length():
    # lengths by conversation: 0:5 1:3 2:8 3:2 4:6 5:3 6:1, budget 12 tokens, one pool.
    # Longest first: 2(8) 4(6) 0(5) {1,5}(3) 3(2) 6(1).
    #   [2]          8 x 2 = 16 > 12, so 2 goes alone
    #   [4, 0]       6 x 2 = 12 fits; 6 x 3 = 18 does not
    #   [1, 5, 3, 6] 3 x 4 = 12 fits
    lengths = [5, 3, 8, 2, 6, 3, 1]
    for epoch in range(5):
        batches = token_budget_batches(lengths, range(7), max_tokens=12, seed=0, epoch=epoch)
        assert sorted(map(sorted, batches)) == [[0, 4], [1, 3, 5, 6], [2]]


def test_no_conversation_lost_or_repeated_and_every_batch_within_budget():
    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    train = sorted(rng.sample(range(300), 250))  # a split: the others are held out and must never appear
    budget = 128
    orders = []
    for epoch in range(4):
        batches = token_budget_batches(lengths, train, budget, seed=7, epoch=epoch, pool_size=64)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == train  # each training conversation exactly once, nothing else
        assert all(max(lengths[i] for i in batch) * len(batch) <= budget for batch in batches)
        # Padding stays small: each pool is sorted by length before it is cut.
        padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
        assert padded < 1.15 * sum(lengths[i] for i in train)
        orders.append(flat)
    assert len({tuple(order) for order in orders}) == 4  # a new order every epoch
    assert token_budget_batches(lengths, train, budget, seed=7, epoch=2, pool_size=64) == token_budget_batches(
        lengths, train, budget, seed=7, epoch=2, pool_size=64)  # seeded


def test_a_conversation_longer_than_the_budget_goes_alone():
    batches = token_budget_batches([10, 2, 2], [0, 1, 2], max_tokens=4, seed=0, epoch=0)
    assert sorted(map(sorted, batches)) == [[0], [1, 2]]


def test_the_plan_runs_epoch_after_epoch_and_counts_steps():
    lengths = [4] * 10
    plan = micro_batch_plan(lengths, list(range(10)), seed=3, batch_size=99, batch_tokens=12)  # 3 per batch: 4 batches
    first_epoch = [plan[i] for i in range(4)]
    second_epoch = [plan[i] for i in range(4, 8)]
    assert sorted(i for b in first_epoch for i in b) == list(range(10))
    assert sorted(i for b in second_epoch for i in b) == list(range(10))
    assert steps_for_epochs(plan, epochs=2.5, grad_accum=1) == 10
    assert steps_for_epochs(plan, epochs=1, grad_accum=3) == 2  # ceil(4 / 3)
    # Counted in conversations, the plan is the seeded shuffle cut into batch_size pieces.
    by_count = micro_batch_plan(lengths, list(range(10)), seed=3, batch_size=4, batch_tokens=None)
    assert [by_count[i] for i in range(3)] == count_batches(range(10), 4, seed=3, epoch=0)
    assert [len(by_count[i]) for i in range(3)] == [4, 4, 2]


def test_a_budget_below_max_length_is_refused():
    from medusaforge.training.medusa1 import Medusa1Config

    with pytest.raises(ValueError, match="--batch-tokens 256 is below --max-length 512"):
        Medusa1Config(data="x.jsonl", batch_tokens=256, max_length=512).validate()
