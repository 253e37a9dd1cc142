"""Adaptive drafting: shrink the draft, or stop drafting, when recent acceptance does not pay.

Every verify step tells us which draft nodes were accepted. Node indices increase along a path and
a draft cut to its first k candidate nodes is still a tree, so one step at full size also says what
every smaller draft would have accepted: the accepted nodes with index <= k. Over a window of recent
steps that gives the expected tokens per step at each size; the step cost at each size comes from
`medusaforge tree`'s fit (tree file) or from the decoder's own timings; the size with the most
tokens per second wins, and 0 (a plain one-token step) wins unless a draft beats it.

While drafting, every `probe_every`-th step drafts the full tree again, so what every size would
accept stays fresh. While off, the probes themselves are what drafting still costs: each one that
finds drafting still not paying doubles the wait before the next (up to `max_probe_every` steps), and
one that finds it paying goes back to every `probe_every`-th step. So a prompt that starts to copy
(lookup) or a stretch the heads know is still noticed, and a drafter that never pays costs a few
probes per sequence (in fp32 on an AVX2 host a full tree pass costs about 1.85x a plain step, and
probing every 8th step alone made decoding about 6% slower than greedy). Output tokens never depend
on the size: greedy decoding stays identical to plain greedy decoding.
"""

from __future__ import annotations

import statistics
from collections import deque

from medusaforge.decoding.cost import StepCost, choose_draft_size, fit_step_cost


def accepted_if_truncated(nodes: list[int], size: int) -> int:
    """nodes: one step's accepted node indices, root (0) first. -> candidates a draft cut to its
    first `size` candidate nodes (nodes 1..size) would have accepted: indices increase along the
    path, so those nodes are a prefix of it."""
    return sum(1 for node in nodes[1:] if node <= size)


def expected_accept_by_size(history, sizes) -> dict[int, float]:
    """history: (candidate nodes drafted, accepted node indices) per recent step.
    -> {size: mean tokens per step (base token included) had each draft been cut to `size`}, over
    the steps that drafted at least `size` nodes; a size no step reached is left out."""
    expected = {}
    for size in sizes:
        seen = [accepted_if_truncated(nodes, size) for drafted, nodes in history if drafted >= size]
        if seen:
            expected[size] = 1.0 + sum(seen) / len(seen)
    return expected


def candidate_sizes(full: int) -> list[int]:
    """0 (no drafting), powers of two below `full`, and `full`."""
    sizes, size = [0], 1
    while size < full:
        sizes.append(size)
        size *= 2
    return sizes + [full] if full > 0 else sizes


class AdaptiveDrafting:
    """The decoder asks `next_size()` before each step (None: the whole draft, 0: no draft, k: its
    first k candidate nodes) and calls `record` after it.

    cost, plain_seconds: from a tree file written by `medusaforge tree`; without them the decoder's
    own step timings are fitted (fit_step_cost), with a plain step now and then to time one.
    """

    def __init__(self, cost: StepCost | None = None, plain_seconds: float | None = None, window: int = 16, probe_every: int = 8,
                 max_probe_every: int = 64) -> None:
        if window < 1 or probe_every < 2 or max_probe_every < probe_every:
            raise ValueError(f"adaptive drafting: need window >= 1 and 2 <= probe_every <= max_probe_every, "
                             f"got {window}, {probe_every} and {max_probe_every}")
        self.given_cost = cost
        self.given_plain = plain_seconds if plain_seconds is not None else (cost(0) if cost is not None else None)
        self.window, self.probe_every, self.max_probe_every = window, probe_every, max_probe_every
        self.timings: dict[int, deque] = {}  # drafted nodes -> recent step seconds; kept across sequences (a host property)
        self.full = 0
        self.reset()

    def reset(self) -> None:
        """A new sequence: acceptance history is per sequence, timings are kept."""
        self.history: deque = deque(maxlen=self.window)
        self.steps = 0
        self.choice: int | None = None
        self.probe_interval = self.probe_every
        self.next_probe = self.probe_every
        self.probing = False

    def next_size(self) -> int | None:
        self.steps += 1
        self.probing = False
        if self.given_cost is None and len(self.timings.get(0, ())) < 3:
            # without plain timings the fit cannot tell what drafting saves: time one every other step
            return 0 if self.steps % 2 == 0 else None
        if self.steps >= self.next_probe:
            self.probing = True
            return None  # the whole draft: refresh what every size would accept
        return self.choice

    def record(self, drafted: int, nodes: list[int], seconds: float) -> None:
        self.timings.setdefault(drafted, deque(maxlen=8)).append(seconds)
        if drafted == 0 and not self.probing:
            # A plain step says nothing about acceptance: only a probe turns drafting back on, so a
            # noisy plain timing cannot flip it on for one losing step.
            return
        self.history.append((drafted, list(nodes)))
        self.full = max(self.full, drafted)
        cost, plain = self.cost()
        if cost is None:
            self.choice = None
            return
        best = choose_draft_size(expected_accept_by_size(self.history, candidate_sizes(self.full)), cost, plain)
        self.choice = None if best >= self.full else best
        if self.probing:
            off = self.choice == 0
            self.probe_interval = min(2 * self.probe_interval, self.max_probe_every) if off else self.probe_every
            self.next_probe = self.steps + self.probe_interval

    def cost(self) -> tuple[StepCost | None, float | None]:
        if self.given_cost is not None:
            return self.given_cost, self.given_plain
        drafted = sorted(n for n in self.timings if n > 0)
        if not drafted or 0 not in self.timings:
            return None, None
        # The plain step is its own median, never the line's intercept: a drafter that runs a model
        # (EAGLE-3) costs the same whatever the cut, so a line through all sizes would hand most of
        # that cost to the plain step and keep drafting that does not pay. One point per drafted
        # size, its median: merged drafts (lookup) come in many sizes, and the median already
        # discounts a size's odd slow step.
        medians = [statistics.median(self.timings[n]) for n in drafted]
        fitted = fit_step_cost(drafted, medians) if len(drafted) > 1 else StepCost(medians[0], 0.0)
        return fitted, statistics.median(self.timings[0])
