"""How many optimizer steps a run makes, and the learning rate at each of them.

Without a time budget the count is fixed before the first step: --max-steps, else --epochs passes
over the training split. With --max-minutes that count is an upper bound, and the run makes as many
of those steps as fit in the time: after every step the mean step time so far predicts how many
more fit, and the total follows it. A slower host therefore trains fewer steps rather than for
longer, and no step is started that would likely end past the limit.

The learning rate follows linear warmup then cosine decay over the *current* total, so when the
total moves the decay still finishes at the end instead of being cut off half way (the estimate
settles within a few steps, so later moves are small). A run without a time budget never changes
its total, so its schedule (and a resume of it) is exactly reproducible.
"""

from __future__ import annotations

import math
import time

import torch

from medusaforge.training.common import cosine_with_warmup
from medusaforge.training.distributed import all_reduce_sum


def steps_that_fit(budget_seconds: float, elapsed_seconds: float, steps_done: int, seconds_per_step: float, planned_steps: int) -> int:
    """The total step count that ends within the budget: the steps done plus as many more as the
    time left holds at `seconds_per_step`, at most `planned_steps` and at least the steps done (and 1)."""
    if seconds_per_step <= 0:
        return planned_steps
    more = math.floor(max(0.0, budget_seconds - elapsed_seconds) / seconds_per_step)
    return max(1, steps_done, min(planned_steps, steps_done + more))


class StepBudget:
    """The run's total optimizer steps (`total`), and the LR multiplier at a step under that total.

    planned_steps: from --max-steps or --epochs; max_minutes: None for a fixed count."""

    def __init__(self, planned_steps: int, max_minutes: float | None, warmup_ratio: float, min_lr_ratio: float) -> None:
        self.planned_steps = planned_steps
        self.total = planned_steps
        self.budget_seconds = max_minutes * 60.0 if max_minutes else None
        self.warmup_ratio, self.min_lr_ratio = warmup_ratio, min_lr_ratio
        self.spent_seconds = 0.0  # training time before this process started (a resumed run)
        self.step_seconds: list[float] = []  # each step of this process

    def lr_multiplier(self, step: int) -> float:
        warmup_steps = max(1, int(self.total * self.warmup_ratio))
        return cosine_with_warmup(step, self.total, warmup_steps, self.min_lr_ratio)

    def step_finished(self, steps_done: int, step_seconds: float, elapsed_seconds: float) -> bool:
        """Record one step's time (`elapsed_seconds`: this process's training time so far); with a
        time budget, set the total to the steps that fit. -> whether the total changed.

        The first step of a process carries one-off costs (allocation, warm-up, first reads), so it
        is left out of the mean step time, and alone it decides only whether to stop (when one more
        step at its pace would end past the budget). From the second step on, the total follows the
        mean of the later steps, up or down, never past the planned steps."""
        self.step_seconds.append(step_seconds)
        if self.budget_seconds is None:
            return False
        spent = self.spent_seconds + elapsed_seconds
        if len(self.step_seconds) == 1:
            if steps_that_fit(self.budget_seconds, spent, steps_done, step_seconds, self.planned_steps) > steps_done:
                return False
            fits = steps_done
        else:
            timed = self.step_seconds[1:]
            fits = steps_that_fit(self.budget_seconds, spent, steps_done, sum(timed) / len(timed), self.planned_steps)
        changed = fits != self.total
        self.total = fits
        return changed

    def state(self, elapsed_seconds: float) -> dict:
        """What a checkpoint keeps so a resumed run continues with the same total and time left."""
        return {"total_steps": self.total, "spent_seconds": self.spent_seconds + elapsed_seconds}

    def restore(self, state: dict | None) -> None:
        if state:
            self.total = int(state["total_steps"])
            self.spent_seconds = float(state["spent_seconds"])


def apply_lr(optimizer, scheduler, budget: StepBudget, step: int) -> None:
    """Set every group's LR for `step` from the budget's current total (after the total shrank, the
    scheduler's precomputed value is stale). Peak LRs are the scheduler's base_lrs."""
    for group, base_lr in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base_lr * budget.lr_multiplier(step)


def settle_budget(budget: StepBudget, steps_done: int, step_started: float, started: float, optimizer, scheduler, context) -> bool:
    """After a step's forward and backward, before its optimizer step: with a time budget, let the
    total shrink to what fits and set this step's LR from it. Under torchrun the times are averaged
    over ranks first, so every rank settles on the same total. -> whether the total changed."""
    if budget.budget_seconds is None:
        return False
    now = time.perf_counter()
    times = all_reduce_sum(torch.tensor([now - step_started, now - started], dtype=torch.float64), context) / context.world_size
    changed = budget.step_finished(steps_done, float(times[0]), float(times[1]))
    if changed:
        apply_lr(optimizer, scheduler, budget, steps_done - 1)
    return changed
