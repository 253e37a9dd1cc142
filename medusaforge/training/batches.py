"""Which conversations go into each micro-batch, for a whole run: counted in conversations
(`--batch-size`) or in tokens (`--batch-tokens`).

A batch of conversations is padded to its longest one, so its cost is (longest length x count),
not the sum of lengths. With a token budget, conversations of similar length are grouped so that
each micro-batch holds as many as fit in the budget: a batch of short replies carries many of them,
a batch of long ones few, and every optimizer step costs about the same. Per epoch:
  1. shuffle the training conversations (seeded by seed and epoch);
  2. cut the shuffled order into pools of POOL_SIZE and sort each pool by length, longest first
     (pools keep the grouping from repeating the same batches every epoch);
  3. fill batches from each sorted pool: take conversations while (first's length x count) fits;
  4. shuffle the batches, so lengths do not come in a fixed order.
Every training conversation lands in exactly one batch per epoch. A conversation longer than the
budget cannot share a batch and goes alone (the recipes refuse a budget below --max-length).

The plan is fixed by the seed, so after a resume the data position is just the step number.
"""

from __future__ import annotations

import math
import random
from typing import Callable, Sequence

POOL_SIZE = 256  # conversations sorted together; large enough that padding stays a few percent


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def token_budget_batches(lengths: Sequence[int], indices: Sequence[int], max_tokens: int, seed: int, epoch: int,
                         pool_size: int = POOL_SIZE) -> list[list[int]]:
    """One epoch's micro-batches of `indices` (conversation numbers; `lengths[i]` is conversation i's
    token count), each with (longest length x count) <= max_tokens unless it is a single conversation."""
    rng = random.Random(epoch_seed(seed, epoch))
    order = list(indices)
    rng.shuffle(order)
    batches: list[list[int]] = []
    for start in range(0, len(order), pool_size):
        # Stable sort: equal lengths keep their shuffled order, so ties differ from epoch to epoch.
        pool = sorted(order[start : start + pool_size], key=lambda i: -lengths[i])
        batch: list[int] = []
        for index in pool:
            longest = lengths[batch[0]] if batch else lengths[index]
            if batch and longest * (len(batch) + 1) > max_tokens:
                batches.append(batch)
                batch = []
            batch.append(index)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def count_batches(indices: Sequence[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches of `batch_size` conversations, in a seeded shuffle (the last may be short)."""
    order = list(indices)
    random.Random(epoch_seed(seed, epoch)).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class MicroBatchPlan:
    """The run's micro-batches, epoch after epoch, made when first asked for: plan[i] is micro-batch
    i of the run. Epochs may differ in their number of batches (token budgets); the plan does not care."""

    def __init__(self, epoch_batches: Callable[[int], list[list[int]]]) -> None:
        self.epoch_batches = epoch_batches
        self.batches: list[list[int]] = []
        self.epochs_made = 0

    def __getitem__(self, index: int) -> list[int]:
        while len(self.batches) <= index:
            self.batches.extend(self.epoch_batches(self.epochs_made))
            self.epochs_made += 1
        return self.batches[index]


def micro_batch_plan(lengths: Sequence[int], train_indices: Sequence[int], seed: int, batch_size: int,
                     batch_tokens: int | None) -> MicroBatchPlan:
    """The plan for a run: token-budget batches when `batch_tokens` is set, else `batch_size` conversations."""
    if batch_tokens:
        return MicroBatchPlan(lambda epoch: token_budget_batches(lengths, train_indices, batch_tokens, seed, epoch))
    return MicroBatchPlan(lambda epoch: count_batches(train_indices, batch_size, seed, epoch))


def steps_for_epochs(plan: MicroBatchPlan, epochs: float, grad_accum: int) -> int:
    """Optimizer steps in `epochs` passes, counted from the first epoch's number of micro-batches."""
    per_epoch = math.ceil(len(plan.epoch_batches(0)) / grad_accum)
    return max(1, int(round(per_epoch * epochs)))
