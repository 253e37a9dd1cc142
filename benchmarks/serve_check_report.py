"""The pure parts of benchmarks/serve_check.py: spec-decode counters -> acceptance, the choice of
num_speculative_tokens from a sweep, the order the modes run in, and the markdown tables that get
recorded. No vLLM here, so tests/test_serve_check.py runs them on hand-made reports.

A report is one engine's run of one mode in one round:
  {"mode", "k", "loaded", "error", "runs": {prompt set: {"one_at_a_time" | "batched": run}}}
  run: {"seconds", "generated_tokens", "tokens_per_second", "token_ids", and for drafting modes
        "num_drafts", "num_accepted_tokens", "num_accepted_tokens_per_pos", "accept_length",
        "acceptance_per_position"}
"""

from __future__ import annotations

import statistics

PASSES = ("one_at_a_time", "batched")

# What each mode is, in the words the table uses.
LABELS = {
    "plain": "plain (no drafting)",
    "ngram": "vLLM `ngram`",
    "suffix": "vLLM `suffix` (Arctic Inference)",
    "medusa": "vLLM `medusa`, our heads' export",
    "eagle3": "vLLM `eagle3`, our EAGLE-3 export",
    "ours-heads": "medusaforge: heads + lookup (`custom_class`)",
    "ours-eagle3": "medusaforge: EAGLE-3 + lookup (`custom_class`)",
}


def acceptance(before: dict, after: dict) -> dict:
    """Counter deltas over one measured pass -> mean accepted length and per-position acceptance.

    accept_length counts the base model's own token: 1 + accepted / drafts (vLLM's
    `vllm:spec_decode_*` counters, summed over engines)."""
    def delta(key):
        now, then = after.get(key, 0), before.get(key, 0)
        if isinstance(now, list):
            return [a - b for a, b in zip(now, then or [0] * len(now))]
        return now - then

    drafts, accepted = delta("num_drafts"), delta("num_accepted_tokens")
    per_position = delta("num_accepted_tokens_per_pos") or []
    return {"num_drafts": drafts, "num_accepted_tokens": accepted, "num_accepted_tokens_per_pos": per_position,
            "accept_length": 1 + accepted / drafts if drafts else None,
            "acceptance_per_position": [a / drafts for a in per_position] if drafts else []}


def choose_k(points: list[dict], tolerance: float = 0.02) -> int | None:
    """The sweep's pick: the smallest K within `tolerance` of the fastest one-at-a-time speed.

    Within a couple of per cent the sweep's few prompts cannot tell K's apart, and a smaller K
    wastes less verification when a batch is large. points: [{"k", "tokens_per_second"}]."""
    measured = [p for p in points if p.get("tokens_per_second")]
    if not measured:
        return None
    best = max(p["tokens_per_second"] for p in measured)
    return min(p["k"] for p in measured if p["tokens_per_second"] >= best * (1 - tolerance))


def sweep_should_stop(points: list[dict]) -> bool:
    """Stop raising K once the two latest K's were both slower than an earlier one: with a chain
    draft, acceptance only falls with depth while the verify cost keeps growing."""
    speeds = [p.get("tokens_per_second") or 0.0 for p in points]
    if not speeds:
        return False
    return len(speeds) - 1 - speeds.index(max(speeds)) >= 2


def alternation(modes: list[str], rounds: int) -> list[tuple[int, str]]:
    """[(round, mode)] in the order the engines run: every mode once per round, one after another,
    the order rotated by one each round so that no mode always runs first (or right after plain)."""
    order = []
    for round_index in range(rounds):
        shift = round_index % len(modes) if modes else 0
        order += [(round_index, mode) for mode in modes[shift:] + modes[:shift]]
    return order


def spread(values: list[float]) -> str:
    """'1.12x' for one round; 'median (min-max)' over several."""
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def identical_count(reports: list[dict], plain_reports: list[dict], prompt_set: str, pass_name: str) -> str:
    """'n/N': prompts whose greedy output equals plain's, token for token, in every round."""
    same = None
    for report, plain in zip(reports, plain_reports):
        ours = report["runs"][prompt_set][pass_name]["token_ids"]
        theirs = plain["runs"][prompt_set][pass_name]["token_ids"]
        flags = [a == b for a, b in zip(ours, theirs)]
        same = flags if same is None else [a and b for a, b in zip(same, flags)]
    return f"{sum(same)}/{len(same)}" if same is not None else "-"


def pooled_acceptance(runs: list[dict]) -> dict:
    """Acceptance over several rounds' runs of one pass: the counters summed, then divided."""
    zero = {"num_drafts": 0, "num_accepted_tokens": 0}
    total = dict(zero, num_accepted_tokens_per_pos=[])
    for run in runs:
        total["num_drafts"] += run.get("num_drafts") or 0
        total["num_accepted_tokens"] += run.get("num_accepted_tokens") or 0
        per_position = run.get("num_accepted_tokens_per_pos") or []
        previous = total["num_accepted_tokens_per_pos"] or [0] * len(per_position)
        total["num_accepted_tokens_per_pos"] = [a + b for a, b in zip(previous, per_position)]
    return acceptance({}, total)


def per_position_cell(rates: list[float]) -> str:
    """'0.62, 0.41, 0.38'; trailing positions that never accepted are folded ('; 0 at 4-24'), as
    suffix decoding may draft up to 24 tokens."""
    if not rates:
        return "-"
    last = max((i for i, rate in enumerate(rates) if rate > 0), default=0)
    cell = ", ".join(f"{rate:.2f}" for rate in rates[: last + 1])
    if last + 1 < len(rates):
        cell += f"; 0 at {last + 2}-{len(rates)}" if last + 2 < len(rates) else f"; 0 at {len(rates)}"
    return cell


def k_label(mode: str, k) -> str:
    if mode == "plain":
        return "-"
    if mode == "suffix":
        return f"<= {k} (its own choice per step)" if k else "dynamic"
    return str(k) if k else "-"


def table(by_round: list[dict[str, dict]], modes: list[str], prompt_sets: list[str]) -> str:
    """The recorded table: a row per mode and prompt set. by_round: [{mode: report}] per round.

    Speeds are medians over rounds; 'vs plain' is taken within each round (plain ran in the same
    round, minutes apart), then given as median (min-max) over rounds."""
    rows = ["| mode | K | prompts | accepted length (one / batched) | acceptance per position (one at a time) | "
            "tok/s one at a time | vs plain | tok/s batched | vs plain | identical to plain (one / batched) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        reports = [rounds[mode] for rounds in by_round if mode in rounds]
        failed = next((r for r in reports if not r.get("loaded")), None)
        if not reports or failed is not None:
            reason = (failed or {}).get("error", "not run")
            rows.append(f"| {LABELS.get(mode, mode)} | - | not run: {_cell(reason)} | | | | | | | |")
            continue
        plains = [rounds.get("plain") for rounds in by_round if mode in rounds]
        have_plain = all(p is not None and p.get("loaded") for p in plains)
        for prompt_set in prompt_sets:
            cells = [LABELS.get(mode, mode), k_label(mode, reports[0].get("k")), prompt_set]
            one = [r["runs"][prompt_set]["one_at_a_time"] for r in reports]
            batched = [r["runs"][prompt_set]["batched"] for r in reports]
            if mode == "plain":
                cells += ["-", "-"]
            else:
                one_acc, batched_acc = pooled_acceptance(one), pooled_acceptance(batched)
                lengths = [a["accept_length"] for a in (one_acc, batched_acc)]
                cells.append(" / ".join(f"{x:.2f}" if x else "-" for x in lengths))
                cells.append(per_position_cell(one_acc["acceptance_per_position"]))
            for name, runs in (("one_at_a_time", one), ("batched", batched)):
                cells.append(f"{statistics.median(r['tokens_per_second'] for r in runs):.1f}")
                if mode == "plain" or not have_plain:
                    cells.append("1.00x" if mode == "plain" else "-")
                    continue
                ratios = [run["tokens_per_second"] / p["runs"][prompt_set][name]["tokens_per_second"]
                          for run, p in zip(runs, plains)]
                cells.append(spread(ratios))
            if mode == "plain" or not have_plain:
                cells.append("-")
            else:
                cells.append(" / ".join(identical_count(reports, plains, prompt_set, p) for p in PASSES))
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def sweep_table(sweeps: dict[str, dict]) -> str:
    """One row per swept mode: one-at-a-time tok/s and accepted length at each K, and the pick."""
    all_ks = sorted({p["k"] for s in sweeps.values() for p in s.get("points", [])})
    rows = ["| mode | " + " | ".join(f"K={k}" for k in all_ks) + " | chosen K |",
            "|---|" + "---|" * len(all_ks) + "---|"]
    for mode, sweep in sweeps.items():
        points = {p["k"]: p for p in sweep.get("points", [])}
        cells = []
        for k in all_ks:
            point = points.get(k)
            if point is None:
                cells.append("-")
            else:
                length = point.get("accept_length")
                cells.append(f"{point['tokens_per_second']:.1f} tok/s, {length:.2f}" if length
                             else f"{point['tokens_per_second']:.1f} tok/s")
        chosen = sweep.get("chosen")
        rows.append(f"| {LABELS.get(mode, mode)} | " + " | ".join(cells) + " | "
                    + (str(chosen) if chosen else f"none: {_cell(sweep.get('error', 'no point measured'))}") + " |")
    return "\n".join(rows)


def _cell(text: str, limit: int = 160) -> str:
    """A message fit for one markdown cell: one line, no pipes, bounded."""
    return " ".join(str(text).replace("|", "/").split())[:limit]
