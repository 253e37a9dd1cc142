"""Tree search: the Medusa tree that gives the most tokens per second on this host, or none.

1. Accuracy: on calibration text the base wrote itself, the rank of the right token in each head's
   top-k at every position; a path's acceptance rate is the share of positions whose ranks match
   the whole path (joint, so correlated heads are fine), and the best tree of each size takes the
   most often accepted nodes.
2. Cost: the real decode step (propose + `verify_step`) is timed at every size, and a plain
   one-token step too, interleaved round by round in rotating order and repeated, so a burst of
   load hits every size alike; a robust line (decoding/cost.py) is fitted through the timings.
3. Choice: the size with the most expected tokens per second, where 0, plain decoding, wins unless
   some tree beats it.
"""

from __future__ import annotations

import statistics
import time

import torch

from medusaforge.decoding.cost import StepCost, choose_draft_size, fit_step_cost
from medusaforge.decoding.verify import crop_cache, new_cache, prefill, verify_step
from medusaforge.drafters.medusa_proposer import MedusaProposer, normalise_paths
from medusaforge.drafters.proposer import root_only
from medusaforge.models import final_hidden_states

Path_ = tuple[int, ...]


@torch.inference_mode()
def truth_ranks(base, heads, sequence: torch.Tensor, prompt_length: int, max_rank: int) -> torch.Tensor:
    """-> [P, num_heads] long: at each generated position t of `sequence` ([T]), the rank of the
    base's own token t + k + 2 among head k's top `max_rank` candidates, -1 if absent or past the end."""
    hidden = final_hidden_states(base, sequence[None])[0]  # [T, hidden]
    start, stop = prompt_length - 1, len(sequence) - 2  # positions whose head-0 target exists
    ranks = torch.full((max(stop - start, 0), heads.num_heads), -1, dtype=torch.long)
    for k in range(heads.num_heads):
        end = len(sequence) - (k + 2)  # head k at t predicts t + k + 2
        if end <= start:
            continue
        top = heads.head_logits(hidden[start:end], k).topk(max_rank, dim=-1).indices  # [P_k, max_rank]
        hit = top == sequence[start + k + 2 : end + k + 2, None]
        ranks[: end - start, k] = torch.where(hit.any(-1), hit.long().argmax(-1), -1).cpu()
    return ranks


def path_frequencies(rank_paths: torch.Tensor) -> dict[Path_, float]:
    """rank_paths: [P, num_heads] long, at each calibration position the rank of the right token in
    each head's candidate list (-1 for "not in its top-k").
    -> {path: share of positions at which that node would be accepted}.

    A node is accepted exactly when every head on its path ranked the right token where the path
    says, so these shares are measured joint accuracies: no independence between heads assumed.
    """
    counts: dict[Path_, int] = {}
    for row in rank_paths.tolist():
        path: Path_ = ()
        for rank in row:
            if rank < 0:
                break
            path = path + (rank,)
            counts[path] = counts.get(path, 0) + 1
    total = max(len(rank_paths), 1)
    return {path: count / total for path, count in counts.items()}


def grow_tree_from_frequencies(frequencies: dict[Path_, float], num_nodes: int) -> list[list[int]]:
    """The `num_nodes` most often accepted nodes, best first. A node is never accepted more often
    than its parent, and ties go to the shorter path, so every chosen node's parent comes before it."""
    ranked = sorted(frequencies, key=lambda p: (-frequencies[p], len(p), p))
    return [list(p) for p in normalise_paths(ranked[:num_nodes])]


def expected_accept_length_from_frequencies(paths, frequencies: dict[Path_, float]) -> float:
    """Expected tokens per verify step (base token included) measured on calibration positions."""
    return 1.0 + sum(frequencies.get(p, 0.0) for p in normalise_paths(paths))


@torch.inference_mode()
def time_steps(base, heads, trees: dict[int, list[list[int]]], prefix: torch.Tensor, rounds: int) -> dict[int, list[float]]:
    """Seconds of real decode steps after `prefix` ([T]): {size: one timing per round}.

    trees: {candidate nodes: paths}; size 0 times a plain step (no draft). Each round times every
    size once, starting one size later than the round before, after one untimed warm-up round.
    """
    cache = new_cache(base)
    verified = prefill(base, cache, prefix[:-1])
    length = cache.get_seq_length()
    tokens = prefix.tolist()
    proposers = {size: MedusaProposer(heads, paths) if size > 0 else None for size, paths in trees.items()}
    sizes = list(proposers)
    timings: dict[int, list[float]] = {size: [] for size in sizes}
    for round_ in range(rounds + 1):
        for i in range(len(sizes)):
            size = sizes[(i + round_) % len(sizes)]
            start = time.perf_counter()
            proposer = proposers[size]
            draft = proposer.propose(tokens, verified) if proposer is not None else root_only(tokens[-1], prefix.device)
            verify_step(base, cache, draft)  # ends in a host sync: the timing is the whole step
            seconds = time.perf_counter() - start
            crop_cache(cache, length)
            if round_ > 0:  # round 0 warms up kernels for every shape
                timings[size].append(seconds)
    return timings


def choose_tree(expected_accept: dict[int, float], timings: dict[int, list[float]]) -> tuple[int, StepCost, float]:
    """-> (chosen candidate nodes, 0 for no drafting; fitted step cost; median plain step seconds).

    expected_accept: {size: expected tokens per step}; timings: {size: seconds}, size 0 = plain.
    The line is fitted through the drafted sizes only: a plain step skips the drafter and the tree
    mask, so it is its own point rather than the line's intercept.
    """
    drafted = [(size, t) for size, times in timings.items() if size > 0 for t in times]
    if 0 not in timings or not timings[0]:
        raise ValueError("choose_tree: needs timings of plain steps (size 0)")
    if len({size for size, _ in drafted}) >= 2:
        cost = fit_step_cost([s for s, _ in drafted], [t for _, t in drafted])
    else:  # one drafted size: its median, with no per-node slope to fit
        cost = StepCost(statistics.median(t for _, t in drafted), 0.0) if drafted else StepCost(float("inf"), 0.0)
    plain = statistics.median(timings[0])
    return choose_draft_size(expected_accept, cost, plain), cost, plain
