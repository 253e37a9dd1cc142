"""Decode speed, batch 1: HF greedy vs HF prompt-lookup vs our decoder without drafting vs Medusa (default tree,
searched tree) vs our prompt lookup alone and merged with the heads' tree (hybrid) vs an EAGLE-3 draft (--eagle3 DIR),
alone (eagle3) and with lookup merged into its tree (eagle3-hybrid).

Every method runs on the same prompts in one process, interleaved prompt by prompt after a warm-up, so the
ratios are measured side by side under the same load. The order of the methods rotates from one round to the
next (no method always runs first, right after another's cache traffic), and with --repeats N each prompt
goes through every method N times: each ratio to HF greedy is given as the median of the N per-repeat ratios
with their min-max. The "ours, no drafting" row runs our decoder's own verify step one token at a time, so
"vs greedy" splits into our per-step overhead against HF generate() and what drafting gains on top of it.
Usage:

  python benchmarks/decode_speed.py --heads runs/demo/heads --tree tree.json --prompts mt-bench --limit 16
  python benchmarks/decode_speed.py --heads runs/demo/heads --prompts copy-heavy --limit 0 --repeats 3
  python benchmarks/decode_speed.py --heads runs/demo/heads --eagle3 runs/eagle3 --eagle-nodes 16
  python benchmarks/decode_speed.py --eagle3 runs/eagle3-demo --eagle-topk 4 --eagle-depth 2 1 --eagle-nodes 8 4 --rows eagle3
  python benchmarks/decode_speed.py --prompts mt-bench --limit 80 --dtype fp32 --rows plain,hybrid   # identity and speed in fp32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.decoder import eagle3_generate, medusa_generate, speculative_generate
from medusaforge.decoding.loading import adaptive_drafting, hf_greedy, hf_prompt_lookup, load_for_decoding, stop_token_ids
from medusaforge.decoding.tree import default_tree, load_tree
from medusaforge.decoding.loading import load_eagle3_proposer
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.drafters.hybrid import accept_by_source
from medusaforge.drafters.lookup import LookupProposer

GREEDY = "hf greedy"
PLAIN = "ours, no drafting"
ROWS = ("plain", "hf-lookup", "heads", "searched", "lookup", "hybrid", "eagle3", "eagle3-hybrid")


def cpu_capability(flags: set[str] | None) -> str:
    """The CPU flags that decide whether bf16 runs natively (else `--dtype auto` picks fp32); None: unknown."""
    if flags is None:
        return "cpu: flags unknown (no /proc/cpuinfo)"
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    shown = "  ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in ("avx2", "avx512_bf16", "amx_bf16"))
    return f"cpu: {shown}  -> native bf16: {'yes' if native else 'no'}"


def cpu_flags() -> set[str] | None:
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return None


def rotated(names: list[str], offset: int) -> list[str]:
    """The methods in the order of round `offset`: round 0 as given, round 1 starting from the second, ..."""
    if not names:
        return []
    shift = offset % len(names)
    return names[shift:] + names[:shift]


@dataclass
class Spread:
    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f})"


def ratio_spread(tokens: dict[str, list[int]], seconds: dict[str, list[float]], reference: str) -> dict[str, Spread]:
    """Each method's speed over `reference`'s, per repeat, -> median and min-max over the repeats.

    tokens[name][r], seconds[name][r]: what the method emitted and took over all prompts in repeat r. A
    repeat's ratio compares the two methods timed within the same rounds, so load that comes and goes
    moves both; the spread over repeats shows how much the timing itself wanders.
    """
    spreads = {}
    for name in tokens:
        ratios = [(t / s) / (rt / rs) for t, s, rt, rs in zip(tokens[name], seconds[name], tokens[reference], seconds[reference])]
        spreads[name] = Spread(statistics.median(ratios), min(ratios), max(ratios))
    return spreads


def token_count_notes(tokens_per_prompt: dict[str, list[int]], reference: str) -> list[str]:
    """Lines that say which methods emitted a different number of tokens than `reference`, prompt by prompt.

    A method that stops earlier (an EOS the reference did not reach) gets a higher tok/s for less text, so
    a ratio over different token counts is not a like-for-like speed. [] when every count matches.
    """
    expected = tokens_per_prompt[reference]
    notes = []
    for name, counts in tokens_per_prompt.items():
        differing = sum(a != b for a, b in zip(counts, expected))
        if name == reference or not differing:
            continue
        total, reference_total = sum(counts), sum(expected)
        notes.append(f"{name}: {total} tokens against {reference}'s {reference_total} ({(total - reference_total) / reference_total:+.1%}), "
                     f"different counts on {differing} of {len(expected)} prompts: its tok/s is over different text")
    return notes


def zip_tree_shapes(topks: list[int], depths: list[int], nodes: list[int]) -> list[DynamicTree]:
    """EAGLE-3 tree shapes from the three flags' values, position by position; a flag given one value
    applies to every shape. -> [DynamicTree]; ValueError when two flags give different counts above one."""
    counts = {len(values) for values in (topks, depths, nodes)} - {1}
    if len(counts) > 1:
        raise ValueError(f"--eagle-topk, --eagle-depth and --eagle-nodes: give one value or the same number of values, "
                         f"got {len(topks)}, {len(depths)} and {len(nodes)}")
    count = counts.pop() if counts else 1
    widen = lambda values: values * count if len(values) == 1 else values
    return [DynamicTree(*shape) for shape in zip(widen(topks), widen(depths), widen(nodes))]


def build_methods(args, parser, rows: list[str]):
    """-> (base, encoded prompts, {name: run(ids, n) -> tokens}, {name: per-step lists}) for the rows asked for."""
    tokenizer, base, heads = load_for_decoding(args.model, args.heads, args.dtype, args.device)
    eos = stop_token_ids(tokenizer, base)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in load_prompts(args.prompts, args.limit)]
    default = default_tree(heads.num_heads)
    methods = {GREEDY: lambda ids, n: hf_greedy(base, ids, n, eos)}
    if "hf-lookup" in rows:
        methods[f"hf prompt lookup ({args.prompt_lookup_tokens})"] = lambda ids, n: hf_prompt_lookup(
            base, ids, n, eos, args.prompt_lookup_tokens)
    # per row, each verify step: the accepted path's source, its length, the nodes drafted (0: a plain step)
    steps: dict[str, tuple[list[str], list[int], list[int]]] = {}

    def ours(name: str, tree: list[list[int]], tree_file=None, lookup: bool = False, proposer=None, drafting: bool = True):
        """A row decoded as `medusaforge generate` does, with its own adaptive-drafting rule and timings."""
        adaptive = adaptive_drafting(tree_file, args.adaptive, base.dtype) if drafting else None
        lookup_proposer = LookupProposer(num_tokens=args.lookup_tokens) if lookup else None
        steps[name] = ([], [], [])

        def run(ids, n):
            if proposer is not None:
                result = eagle3_generate(base, proposer, ids, n, eos, adaptive=adaptive, lookup=lookup_proposer)
            elif not drafting:  # the same decoder, every step a plain one
                result = speculative_generate(base, None, ids, n, eos)
            else:
                result = medusa_generate(base, heads, ids, n, eos, tree, lookup=lookup_proposer, adaptive=adaptive)
            steps[name][0].extend(result.sources or [])
            steps[name][1].extend(result.accepted)
            steps[name][2].extend(result.drafted)
            return result.tokens

        methods[name] = run

    if "plain" in rows:
        ours(f"{PLAIN} (plain steps)", [], drafting=False)
    if "heads" in rows:
        ours(f"medusa default tree ({len(default)} nodes)", default)
    searched = load_tree(args.tree) if args.tree else None
    if "searched" in rows and searched is not None:
        ours(f"medusa searched tree ({f'{len(searched)} nodes' if searched else 'no drafting'})", searched, Path(args.tree))
    if "lookup" in rows:
        ours(f"lookup alone ({args.lookup_tokens})", [], lookup=True)
    if "hybrid" in rows:  # the heads' tree that generate would use: --tree when given, else the default
        if searched is not None:
            ours(f"hybrid: searched tree + lookup ({args.lookup_tokens})", searched, Path(args.tree), lookup=True)
        else:
            ours(f"hybrid: default tree + lookup ({args.lookup_tokens})", default, lookup=True)
    if {"eagle3", "eagle3-hybrid"} & set(rows) and args.eagle3:
        folder = find_eagle3_folder(args.eagle3)
        if folder is None:
            parser.error(f"--eagle3 {args.eagle3}: no EAGLE-3 draft there (config.json with draft_vocab_size)")
        try:
            eagle_trees = zip_tree_shapes(args.eagle_topk, args.eagle_depth, args.eagle_nodes)
        except ValueError as error:
            parser.error(str(error))
        draft = load_eagle3_proposer(folder, base, eagle_trees[0]).draft
        for eagle_tree in eagle_trees:  # each row its own proposer: a proposer's cache follows one decode at a time
            shape = f"top-{eagle_tree.topk}, depth {eagle_tree.depth}, {eagle_tree.num_nodes} nodes"
            if "eagle3" in rows:
                ours(f"eagle-3 ({shape})", [], proposer=Eagle3Proposer(draft, eagle_tree))
            if "eagle3-hybrid" in rows:
                ours(f"eagle-3 + lookup ({shape}; {args.lookup_tokens})", [], lookup=True, proposer=Eagle3Proposer(draft, eagle_tree))
    return base, encoded, methods, steps


def time_methods(methods: dict, encoded: list, max_new_tokens: int, repeats: int):
    """Every prompt through every method `repeats` times, rotating the order each round.

    -> (tokens[name][r], seconds[name][r] summed over prompts; tokens per prompt and identical-to-greedy
    counts, both from the first repeat).
    """
    names = list(methods)
    tokens = {name: [0] * repeats for name in names}
    seconds = {name: [0.0] * repeats for name in names}
    per_prompt = {name: [] for name in names}
    identical = dict.fromkeys(names, 0)
    round_index = 0
    for index, ids in enumerate(encoded, 1):
        outputs = {}
        for repeat in range(repeats):
            for name in rotated(names, round_index):
                start = time.perf_counter()
                out = methods[name](ids, max_new_tokens)
                seconds[name][repeat] += time.perf_counter() - start
                tokens[name][repeat] += len(out)
                outputs.setdefault(name, out)
            round_index += 1
        for name in names:
            per_prompt[name].append(len(outputs[name]))
            identical[name] += outputs[name] == outputs[GREEDY]
        # A long run that is cut short still leaves its figures so far.
        print(f"[{index}/{len(encoded)}] " + "  ".join(
            f"{name.split(' (')[0]} {sum(tokens[name]) / sum(seconds[name]):.1f} tok/s {identical[name]}=" for name in names),
            file=sys.stderr, flush=True)
    return tokens, seconds, per_prompt, identical


def print_report(methods, steps, tokens, seconds, per_prompt, identical, num_prompts: int, repeats: int) -> None:
    spreads = ratio_spread(tokens, seconds, GREEDY)

    def shown(spread: Spread) -> str:  # one repeat has no range to show
        return str(spread) if repeats > 1 else f"{spread.median:.2f}x"

    spread_note = (f"median of {repeats} repeats (min-max over repeats)" if repeats > 1
                   else "one repeat, no spread: pass --repeats 3 or more for one")
    print(f"vs greedy: each repeat's tok/s over HF greedy's in the same rounds, {spread_note}; "
          "method order rotated every round")
    # tokens per step counts plain steps (adaptive drafting) as 1; accept length only the drafted steps
    print(f"| {'method':<36} | {'tokens':>6} | {'tok/s':>6} | {'vs greedy':>18} | identical to greedy | tokens/step | accept length |")
    print(f"|{'-' * 38}|{'-' * 8}|{'-' * 8}|{'-' * 20}|{'-' * 21}|{'-' * 13}|{'-' * 15}|")
    for name in methods:
        tps = sum(tokens[name]) / sum(seconds[name])
        _, accepted, drafted = steps.get(name, ([], [], []))
        on_drafts = [a for a, d in zip(accepted, drafted) if d]
        per_step = f"{1 + sum(accepted) / len(accepted):.2f}" if accepted else "-"
        accept = f"{1 + sum(on_drafts) / len(on_drafts):.2f}" if on_drafts else "-"
        ratio = "1.00x" if name == GREEDY else shown(spreads[name])
        print(f"| {name:<36} | {sum(per_prompt[name]):>6} | {tps:>6.1f} | {ratio:>18} | {identical[name]:>2}/{num_prompts:<16} "
              f"| {per_step:>11} | {accept:>13} |")
    notes = token_count_notes(per_prompt, GREEDY)
    print("tokens: " + ("every method emitted the same count on every prompt" if not notes else "counts differ from greedy's"))
    for line in notes:
        print(f"  {line}")
    plain = next((name for name in methods if name.startswith(PLAIN)), None)
    if plain is not None:  # drafting's own gain, with our per-step overhead against generate() taken out
        over_plain = ratio_spread(tokens, seconds, plain)
        print(f"{plain}: {shown(spreads[plain])} HF greedy (our decoder's own steps against generate()); drafting rows over it: " + "  ".join(
            f"{name.split(' (')[0]} {shown(over_plain[name])}" for name in methods if name not in (GREEDY, plain) and name in steps))
    for name, (sources, accepted, _) in steps.items():  # who supplied each step's accepted path
        if sources:
            by_source = accept_by_source(sources, accepted)
            print(f"{name}: " + "  ".join(f"{s} {v['share']:.0%} of steps (accept {v['accept_length']:.2f})" for s, v in by_source.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heads", default="runs/demo/heads")
    parser.add_argument("--tree", default=None, help="searched tree JSON (from `medusaforge tree`) for the 'searched' row")
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3,
                        help="times each prompt goes through every method; the ratios' spread is over these")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows besides hf greedy, from {','.join(ROWS)}; 'searched' runs only with --tree, "
                             "'eagle3' and 'eagle3-hybrid' only with --eagle3; 'plain' is our decoder with no drafting")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--lookup-tokens", type=int, default=LookupProposer().num_tokens,
                        help="our lookup chain after a full-length match, as `generate --lookup-tokens`")
    parser.add_argument("--eagle3", default=None, help="EAGLE-3 draft folder (train --method eagle3's OUT, OUT/draft or an export)")
    # One value or several: --eagle-topk 4 --eagle-depth 2 1 --eagle-nodes 8 4 times two tree shapes side by side.
    parser.add_argument("--eagle-topk", type=int, nargs="+", default=[DynamicTree.topk])
    parser.add_argument("--eagle-depth", type=int, nargs="+", default=[DynamicTree.depth])
    parser.add_argument("--eagle-nodes", type=int, nargs="+", default=[DynamicTree.num_nodes])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="adaptive drafting in our rows (shrink or skip drafts that do not pay), as generate and eval do")
    args = parser.parse_args()
    print(cpu_capability(cpu_flags()), flush=True)
    rows = [row for row in args.rows.split(",") if row]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: must be 1 or more")

    base, encoded, methods, steps = build_methods(args, parser, rows)
    if not encoded:
        parser.error(f"--prompts {args.prompts} --limit {args.limit}: no prompts to time")
    for run in methods.values():  # warm-up
        run(encoded[0], 16)
    for lists in steps.values():  # count the timed runs only (every repeat: they decode the same steps)
        for values in lists:
            values.clear()
    tokens, seconds, per_prompt, identical = time_methods(methods, encoded, args.max_new_tokens, args.repeats)

    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    print(f"{len(encoded)} prompts ({args.prompts}), {args.max_new_tokens} new tokens, {dtype}, {torch.get_num_threads()} threads, "
          f"adaptive drafting {'on' if args.adaptive else 'off'}, {args.repeats} repeats")
    print_report(methods, steps, tokens, seconds, per_prompt, identical, len(encoded), args.repeats)


if __name__ == "__main__":
    main()
