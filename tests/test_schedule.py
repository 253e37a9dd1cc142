"""The learning-rate schedule at named steps, and the time budget (training/budget.py) that
shrinks the step total to what fits, on hand-worked timings."""

import pytest
import torch

from medusaforge.training.budget import StepBudget, apply_lr, steps_that_fit
from medusaforge.training.setup import optimizer_and_schedule
from medusaforge.training.medusa1 import Medusa1Config


def test_lr_multiplier_at_named_steps_without_a_time_budget():
    # 10 steps, warmup 20% = 2 steps, cosine to 0 over the other 8.
    budget = StepBudget(planned_steps=10, max_minutes=None, warmup_ratio=0.2, min_lr_ratio=0.0)
    assert budget.lr_multiplier(0) == pytest.approx(0.5)
    assert budget.lr_multiplier(1) == pytest.approx(1.0)
    assert budget.lr_multiplier(2) == pytest.approx(1.0)  # start of the cosine
    assert budget.lr_multiplier(6) == pytest.approx(0.5)  # half way through the decay
    assert budget.lr_multiplier(10) == pytest.approx(0.0)
    floor = StepBudget(planned_steps=10, max_minutes=None, warmup_ratio=0.2, min_lr_ratio=0.1)
    assert floor.lr_multiplier(6) == pytest.approx(0.1 + 0.9 * 0.5)
    # No budget: the total never moves, whatever the timings.
    assert not budget.step_finished(1, 1e6, 1e6) and budget.total == 10


def test_the_optimizer_follows_the_schedule_at_named_steps():
    config = Medusa1Config(data="x.jsonl", lr=0.01, warmup_ratio=0.2, min_lr_ratio=0.0)
    budget = StepBudget(10, None, config.warmup_ratio, config.min_lr_ratio)
    optimizer, scheduler = optimizer_and_schedule([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}], config, 10, budget)
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.005) and seen[1] == pytest.approx(0.01) and seen[6] == pytest.approx(0.005)
    assert seen[9] == pytest.approx(0.01 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))


def test_steps_that_fit_hand_worked():
    # 60 s budget, 12 s spent on 1 step, 10 s a step: 4 more fit.
    assert steps_that_fit(60, 12, 1, 10, planned_steps=100) == 5
    assert steps_that_fit(60, 12, 1, 10, planned_steps=3) == 3  # never more than planned
    assert steps_that_fit(60, 70, 1, 70, planned_steps=100) == 1  # over budget: stop after the steps done
    assert steps_that_fit(60, 0, 0, 100, planned_steps=100) == 1  # at least one step


def test_a_time_budget_sets_the_total_to_what_fits_and_the_decay_follows():
    budget = StepBudget(planned_steps=100, max_minutes=1.0, warmup_ratio=0.2, min_lr_ratio=0.0)
    # Step 1 took 12 s, warm-up included: alone it only decides whether to stop (12 + 12 < 60: no).
    assert not budget.step_finished(1, 12.0, 12.0) and budget.total == 100
    # Step 2 took 10 s; the first step is left out of the mean: 2 + floor(38 / 10) = 5 steps fit.
    assert budget.step_finished(2, 10.0, 22.0) and budget.total == 5
    # Warmup 20% of 5 = 1 step, then cosine over 4: step 3 is half way.
    assert budget.lr_multiplier(0) == pytest.approx(1.0)
    assert budget.lr_multiplier(3) == pytest.approx(0.5)
    # Step 3 took 1 s: mean 5.5 s, 3 + floor(37 / 5.5) = 9; the total follows the estimate.
    assert budget.step_finished(3, 1.0, 23.0) and budget.total == 9
    # A slow host: one more step at the first step's pace would end past the budget, so stop.
    slow = StepBudget(planned_steps=100, max_minutes=1.0, warmup_ratio=0.05, min_lr_ratio=0.0)
    assert slow.step_finished(1, 35.0, 35.0) and slow.total == 1
    # A resume continues with the total and the time already spent.
    resumed = StepBudget(planned_steps=100, max_minutes=1.0, warmup_ratio=0.2, min_lr_ratio=0.0)
    resumed.restore(budget.state(elapsed_seconds=23.0))
    assert resumed.total == 9 and resumed.spent_seconds == 23.0
    # Its first step (4 s) fits: 23 + 4 spent, another 4 s step ends at 31 < 60, so it goes on.
    assert not resumed.step_finished(4, 4.0, 4.0) and resumed.total == 9
    # Then 6 s: 5 + floor((60 - 33) / 6) = 9.
    assert not resumed.step_finished(5, 6.0, 10.0) and resumed.total == 9


def test_apply_lr_sets_the_current_steps_lr_after_a_shrink():
    config = Medusa1Config(data="x.jsonl", lr=0.01, warmup_ratio=0.2)
    budget = StepBudget(100, 1.0, config.warmup_ratio, config.min_lr_ratio)
    optimizer, scheduler = optimizer_and_schedule([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.01}], config, 100, budget)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 20)  # warmup of 20 steps planned
    budget.step_finished(1, 12.0, 12.0)
    budget.step_finished(2, 10.0, 22.0)  # total 5: warmup is 1 step
    apply_lr(optimizer, scheduler, budget, step=1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
