"""`medusaforge tree` for an EAGLE-3 draft: the dynamic tree's top-k, depth and node count that give
the most expected tokens per second on this host.

For each (top-k, depth) the calibration prompts are decoded once with the largest node count. The
proposer lists nodes best first, so a draft cut to its first n nodes is exactly the tree it would
have built with num_nodes = n: one decode gives the expected accept length at every n
(adaptive.expected_accept_by_size). Each (top-k, depth, n) step, drafting included, is then timed
after a calibration prefix, interleaved with plain steps; a cost line per (top-k, depth) is fitted
(cost.fit_step_cost: the draft's own depth steps are its fixed part) and the best n chosen as for
Medusa (cost.choose_draft_size). The best (top-k, depth, n) over all wins, or no drafting at all.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch

from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.adaptive import expected_accept_by_size
from medusaforge.decoding.cost import choose_draft_size, drafted_step_seconds, fit_step_cost
from medusaforge.decoding.decoder import speculative_generate
from medusaforge.decoding.loading import load_eagle3_for_decoding, stop_token_ids
from medusaforge.decoding.verify import crop_cache, new_cache, prefill, verify_step
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.drafters.proposer import root_only
from medusaforge.files import atomic_write_text


class RecordingProposer:
    """Passes through to `inner` and keeps (candidate nodes drafted, accepted node indices) per step."""

    def __init__(self, inner) -> None:
        self.inner, self.feature_layers = inner, inner.feature_layers
        self.steps: list[tuple[int, list[int]]] = []
        self._drafted = 0

    def update(self, verified) -> None:
        if verified.nodes is not None:
            self.steps.append((self._drafted, verified.nodes.tolist()))
        self.inner.update(verified)

    def propose(self, tokens, verified):
        draft = self.inner.propose(tokens, verified)
        self._drafted = draft.num_nodes - 1
        return draft


def expected_accept(draft, tree: DynamicTree, base, prompts: list[torch.Tensor], eos, new_tokens: int, sizes) -> dict[int, float]:
    """{n: expected tokens per step with num_nodes = n}, from one greedy decode per prompt."""
    recorder = RecordingProposer(Eagle3Proposer(draft, tree))
    for ids in prompts:
        speculative_generate(base, recorder, ids, new_tokens, eos)
    return expected_accept_by_size(recorder.steps, [n for n in sizes if n > 0])


@torch.inference_mode()
def time_steps(draft, trees: list[DynamicTree], base, prefix: torch.Tensor, rounds: int) -> dict[tuple, list[float]]:
    """Seconds of whole steps (draft + verify) after `prefix`: {(topk, depth, n): timings}, and
    {(0, 0, 0): plain steps}. Every round times each kind once, rotating the order; round 0 warms up."""
    cache = new_cache(base)
    layers = tuple(draft.feature_layers)
    verified = prefill(base, cache, prefix[:-1], layers)
    length = cache.get_seq_length()
    tokens = prefix.tolist()
    proposers = {}
    for topk, depth in {(t.topk, t.depth) for t in trees}:
        # One proposer per (topk, depth) at its largest size; a draft cut to its first n nodes is the
        # tree num_nodes = n builds (nodes are listed best first).
        largest = max(t.num_nodes for t in trees if (t.topk, t.depth) == (topk, depth))
        proposers[(topk, depth)] = proposer = Eagle3Proposer(draft, DynamicTree(topk, depth, largest))
        proposer.update(verified)
    kinds = [(0, 0, 0)] + [(t.topk, t.depth, t.num_nodes) for t in trees]
    timings: dict[tuple, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(rounds + 1):
        for i in range(len(kinds)):
            topk, depth, nodes = kind = kinds[(i + round_) % len(kinds)]
            start = time.perf_counter()
            if nodes == 0:
                draft_tree = root_only(tokens[-1], prefix.device)
            else:
                draft_tree = proposers[(topk, depth)].propose(tokens, verified).truncated(nodes + 1)
            verify_step(base, cache, draft_tree, layers)  # ends in a host sync: the time is the whole step
            seconds = time.perf_counter() - start
            crop_cache(cache, length)
            if round_ > 0:
                timings[kind].append(seconds)
    return timings


def sized(tree: DynamicTree, nodes: int) -> DynamicTree:
    return DynamicTree(tree.topk, tree.depth, nodes)


def search(draft, base, prompts, eos, topks, depths, sizes, new_tokens: int, rounds: int) -> dict:
    """-> {"chosen": {topk, depth, num_nodes} or None (no drafting), "rows": one per (topk, depth),
    "plain_step_ms": ...}."""
    largest = max(sizes)
    grids = [DynamicTree(topk, depth, largest) for topk in topks for depth in depths]
    accept = {(t.topk, t.depth): expected_accept(draft, t, base, prompts, eos, new_tokens, sizes) for t in grids}
    prefix = prompts[0]
    timed = [sized(t, n) for t in grids for n in sizes if n > 0]
    timings = time_steps(draft, timed, base, prefix, rounds)
    plain = statistics.median(timings[(0, 0, 0)])
    rows, best, best_rate = [], None, 1.0 / plain
    for tree in grids:
        points = [(n, s) for (k, d, n), times in timings.items() if (k, d) == (tree.topk, tree.depth) and n for s in times]
        cost = fit_step_cost([n for n, _ in points], [s for _, s in points])
        nodes = choose_draft_size(accept[(tree.topk, tree.depth)], cost, plain)
        rate = accept[(tree.topk, tree.depth)].get(nodes, 1.0) / drafted_step_seconds(cost, nodes, plain) if nodes else 1.0 / plain
        rows.append({"topk": tree.topk, "depth": tree.depth, "expected_accept_length": accept[(tree.topk, tree.depth)],
                     "step_cost_ms": {"fixed": cost.fixed * 1000, "per_node": cost.per_node * 1000},
                     "best_num_nodes": nodes, "expected_tokens_per_s": rate})
        if nodes and rate > best_rate:
            best, best_rate = {"topk": tree.topk, "depth": tree.depth, "num_nodes": nodes}, rate
    return {"chosen": best, "expected_tokens_per_s": best_rate, "expected_speedup": best_rate * plain,
            "plain_step_ms": plain * 1000, "rows": rows}


def save_eagle_tree(result: dict, path: str | os.PathLike, **metadata) -> None:
    """{"eagle": {topk, depth, num_nodes} or null, ...}: what generate/eval --tree read for EAGLE-3.
    The chosen row's fitted step cost and the plain step go in as adaptive drafting reads them
    (decoding/loading.adaptive_drafting: "step_cost" {fixed_ms, per_node_ms}, "plain_step_ms")."""
    chosen = result["chosen"]
    row = next((r for r in result["rows"] if chosen and (r["topk"], r["depth"]) == (chosen["topk"], chosen["depth"])), None)
    if row is not None:
        metadata["step_cost"] = {"fixed_ms": row["step_cost_ms"]["fixed"], "per_node_ms": row["step_cost_ms"]["per_node"]}
        metadata["plain_step_ms"] = result["plain_step_ms"]
    atomic_write_text(path, json.dumps({"eagle": chosen, **metadata, "search": result}, indent=2) + "\n")


def run_search(model: str, drafter, prompts: str, limit: int, new_tokens: int, topks, depths, sizes, rounds: int,
               dtype: str, device: str, out: str | os.PathLike) -> dict:
    """The `medusaforge tree --drafter EAGLE3_DIR` entry: load, search, print a table, write `out`."""
    if len({n for n in sizes if n > 0}) < 2:
        raise ValueError("--sizes: EAGLE-3 needs at least two node counts > 0 to fit a step cost")
    tokenizer, base, proposer = load_eagle3_for_decoding(model, drafter, dtype, device)
    eos = stop_token_ids(tokenizer, base)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in load_prompts(prompts, limit)]
    print(f"tree: EAGLE-3 top-k {list(topks)} x depth {list(depths)} on {len(encoded)} prompts x {new_tokens} tokens, "
          f"node counts {sorted(sizes)}", flush=True)
    result = search(proposer.draft, base, encoded, eos, topks, depths, sizes, new_tokens, rounds)
    print(f"plain one-token step: {result['plain_step_ms']:.1f} ms")
    print(f"{'top-k':>5} {'depth':>5} {'best nodes':>10} {'E[accept]':>9} {'E[tok/s]':>8} {'fixed ms':>8} {'ms/node':>7}")
    for row in result["rows"]:
        accept = row["expected_accept_length"].get(row["best_num_nodes"], 1.0)
        print(f"{row['topk']:>5} {row['depth']:>5} {row['best_num_nodes']:>10} {accept:>9.2f} {row['expected_tokens_per_s']:>8.1f} "
              f"{row['step_cost_ms']['fixed']:>8.1f} {row['step_cost_ms']['per_node']:>7.2f}")
    dtype_name = str(next(base.parameters()).dtype).removeprefix("torch.")
    save_eagle_tree(result, out, dtype=dtype_name, threads=torch.get_num_threads())
    chosen = result["chosen"]
    print(f"chose {chosen} ({result['expected_speedup']:.2f}x plain expected); wrote {out}" if chosen
          else f"chose no drafting: no EAGLE-3 tree beats a plain step here; wrote {out}")
    return result
