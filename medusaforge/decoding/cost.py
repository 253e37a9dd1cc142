"""What a verify step costs, fitted from noisy timings. Pure functions.

A step over a draft of n candidate nodes (root excluded) costs about fixed + per_node * n: reading
the weights once is the fixed part, the extra tokens' matmuls and attention the per-node part. On a
busy CPU single timings are noisy (a 1-node step once took 157 ms beside a 97 ms 4-node step), so
the fit is Theil-Sen: the slope is the median of the slopes between timings of different sizes, the
intercept the median of the residuals. Up to about 29% of wild timings do not move it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class StepCost:
    """Seconds of one step with `n` candidate nodes: fixed + per_node * n."""

    fixed: float
    per_node: float

    def __call__(self, num_nodes: int) -> float:
        return self.fixed + self.per_node * num_nodes


def fit_step_cost(num_nodes: list[int], seconds: list[float]) -> StepCost:
    """Theil-Sen fit of seconds ~ fixed + per_node * num_nodes over paired timings.

    Needs timings of at least two different sizes. The slope is kept >= 0: a larger draft never
    costs less, and a negative slope fitted from noise would make the largest tree look free.
    """
    if len(num_nodes) != len(seconds):
        raise ValueError(f"fit_step_cost: {len(num_nodes)} sizes but {len(seconds)} timings")
    points = list(zip(num_nodes, seconds))
    slopes = [(y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(points) for x2, y2 in points[i + 1 :] if x2 != x1]
    if not slopes:
        raise ValueError("fit_step_cost: needs timings of at least two different draft sizes")
    per_node = max(statistics.median(slopes), 0.0)
    fixed = statistics.median(y - per_node * x for x, y in points)
    return StepCost(fixed, per_node)


def drafted_step_seconds(cost: StepCost, num_nodes: int, plain_seconds: float) -> float:
    """What a step over `num_nodes` candidate nodes is taken to cost. A drafted step is a plain step
    over more tokens, so it never costs less than the plain step plus the line's per-node part: a
    fitted intercept below the plain step is timing noise (one such fit kept drafting on through
    every step of a prompt whose drafts were all rejected)."""
    return max(cost(num_nodes), plain_seconds + cost.per_node * num_nodes)


def choose_draft_size(expected_accept: dict[int, float], cost: StepCost, plain_seconds: float) -> int:
    """The number of candidate nodes with the most expected tokens per second; 0 is "no drafting",
    a plain step of `plain_seconds` emitting exactly one token. A draft must beat it strictly.

    expected_accept: {candidate nodes: expected tokens per step, the base's token included}.
    Each size costs `drafted_step_seconds`.
    """
    best, best_rate = 0, 1.0 / plain_seconds  # tokens per second
    for size in sorted(expected_accept):
        if size <= 0:
            continue
        rate = expected_accept[size] / drafted_step_seconds(cost, size, plain_seconds)
        if rate > best_rate:
            best, best_rate = size, rate
    return best
