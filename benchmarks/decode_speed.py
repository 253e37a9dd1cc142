"""Decode speed, batch 1: HF greedy vs HF prompt-lookup vs Medusa (default tree, searched tree) vs our
prompt lookup alone and merged with the heads' tree (hybrid) vs an EAGLE-3 draft (--eagle3 DIR).

Every method runs on the same prompts in one process, interleaved prompt by prompt after a warm-up,
so the ratios are measured side by side under the same load. Usage:

  python benchmarks/decode_speed.py --heads runs/demo/heads --tree tree.json --prompts mt-bench --limit 16
  python benchmarks/decode_speed.py --heads runs/demo/heads --prompts copy-heavy --limit 0
  python benchmarks/decode_speed.py --heads runs/demo/heads --eagle3 runs/eagle3 --eagle-nodes 16
  python benchmarks/decode_speed.py --prompts mt-bench --limit 80 --dtype fp32 --rows hybrid   # identity and speed in fp32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.decoder import medusa_generate, speculative_generate
from medusaforge.decoding.loading import adaptive_drafting, hf_greedy, hf_prompt_lookup, load_for_decoding, stop_token_ids
from medusaforge.decoding.tree import default_tree, load_tree
from medusaforge.decoding.loading import load_eagle3_proposer
from medusaforge.drafters.eagle3_proposer import DynamicTree
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.drafters.hybrid import accept_by_source
from medusaforge.drafters.lookup import LookupProposer


def cpu_bf16_capability() -> str:
    """The CPU flags that decide whether bf16 runs natively (else `--dtype auto` picks fp32)."""
    try:
        flags = set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return "cpu flags: unknown (no /proc/cpuinfo)"
    wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return "cpu flags: " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted) + f"  -> native bf16: {'yes' if native else 'no'}"


ROWS = ("hf-lookup", "heads", "searched", "lookup", "hybrid", "eagle3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heads", default="runs/demo/heads")
    parser.add_argument("--tree", default=None, help="searched tree JSON (from `medusaforge tree`) for the 'searched' row")
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows besides hf greedy, from {','.join(ROWS)}; 'searched' runs only with --tree, "
                             "'eagle3' only with --eagle3")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10)
    parser.add_argument("--lookup-tokens", type=int, default=LookupProposer().num_tokens,
                        help="our lookup chain after a full-length match, as `generate --lookup-tokens`")
    parser.add_argument("--eagle3", default=None, help="EAGLE-3 draft folder (train --method eagle3's OUT, OUT/draft or an export)")
    parser.add_argument("--eagle-topk", type=int, default=DynamicTree.topk)
    parser.add_argument("--eagle-depth", type=int, default=DynamicTree.depth)
    parser.add_argument("--eagle-nodes", type=int, default=DynamicTree.num_nodes)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="adaptive drafting in our rows (shrink or skip drafts that do not pay), as generate and eval do")
    args = parser.parse_args()
    rows = [row for row in args.rows.split(",") if row]
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"--rows: unknown {', '.join(sorted(unknown))}; choose from {', '.join(ROWS)}")
    print(cpu_bf16_capability(), flush=True)

    tokenizer, base, heads = load_for_decoding(args.model, args.heads, args.dtype, args.device)
    eos = stop_token_ids(tokenizer, base)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in load_prompts(args.prompts, args.limit)]
    default = default_tree(heads.num_heads)
    methods = {"hf greedy": lambda ids, n: hf_greedy(base, ids, n, eos)}
    if "hf-lookup" in rows:
        methods[f"hf prompt lookup ({args.prompt_lookup_tokens})"] = lambda ids, n: hf_prompt_lookup(
            base, ids, n, eos, args.prompt_lookup_tokens)
    # per row, each verify step: the accepted path's source, its length, the nodes drafted (0: a plain step)
    steps: dict[str, tuple[list[str], list[int], list[int]]] = {}

    def ours(name: str, tree: list[list[int]], tree_file=None, lookup: bool = False, proposer=None):
        """A row decoded as `medusaforge generate` does, with its own adaptive-drafting rule and timings."""
        adaptive = adaptive_drafting(tree_file, args.adaptive)
        lookup_proposer = LookupProposer(num_tokens=args.lookup_tokens) if lookup else None
        steps[name] = ([], [], [])

        def run(ids, n):
            if proposer is not None:
                result = speculative_generate(base, proposer, ids, n, eos, adaptive=adaptive)
            else:
                result = medusa_generate(base, heads, ids, n, eos, tree, lookup=lookup_proposer, adaptive=adaptive)
            steps[name][0].extend(result.sources or [])
            steps[name][1].extend(result.accepted)
            steps[name][2].extend(result.drafted)
            return result.tokens

        methods[name] = run

    if "heads" in rows:
        ours(f"medusa default tree ({len(default)} nodes)", default)
    if "searched" in rows and args.tree:
        searched = load_tree(args.tree)
        ours(f"medusa searched tree ({f'{len(searched)} nodes' if searched else 'no drafting'})", searched, Path(args.tree))
    if "lookup" in rows:
        ours(f"lookup alone ({args.lookup_tokens})", [], lookup=True)
    if "hybrid" in rows:
        ours(f"hybrid: default tree + lookup ({args.lookup_tokens})", default, lookup=True)
    if "eagle3" in rows and args.eagle3:
        folder = find_eagle3_folder(args.eagle3)
        if folder is None:
            parser.error(f"--eagle3 {args.eagle3}: no EAGLE-3 draft there (config.json with draft_vocab_size)")
        eagle_tree = DynamicTree(args.eagle_topk, args.eagle_depth, args.eagle_nodes)
        ours(f"eagle-3 (top-{eagle_tree.topk}, depth {eagle_tree.depth}, {eagle_tree.num_nodes} nodes)", [],
             proposer=load_eagle3_proposer(folder, base, eagle_tree))

    for run in methods.values():  # warm-up
        run(encoded[0], 16)
    for lists in steps.values():  # count the timed runs only
        for values in lists:
            values.clear()
    seconds = dict.fromkeys(methods, 0.0)
    tokens = dict.fromkeys(methods, 0)
    identical = dict.fromkeys(methods, 0)
    for index, ids in enumerate(encoded, 1):
        reference = None
        for name, run in methods.items():
            start = time.perf_counter()
            out = run(ids, args.max_new_tokens)
            seconds[name] += time.perf_counter() - start
            tokens[name] += len(out)
            reference = out if reference is None else reference
            identical[name] += out == reference
        # A long run that is cut short still leaves its figures so far.
        print(f"[{index}/{len(encoded)}] " + "  ".join(
            f"{name.split(' (')[0]} {tokens[name] / seconds[name]:.1f} tok/s {identical[name]}=" for name in methods),
            file=sys.stderr, flush=True)

    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    print(f"{len(encoded)} prompts ({args.prompts}), {args.max_new_tokens} new tokens, {dtype}, {torch.get_num_threads()} threads, "
          f"adaptive drafting {'on' if args.adaptive else 'off'}")
    greedy_tps = tokens["hf greedy"] / seconds["hf greedy"]
    # tokens per step counts plain steps (adaptive drafting) as 1; accept length only the drafted steps
    print(f"| {'method':<34} | {'tokens':>6} | {'tok/s':>6} | {'vs greedy':>9} | identical to greedy | tokens/step | accept length |")
    print(f"|{'-' * 36}|{'-' * 8}|{'-' * 8}|{'-' * 11}|{'-' * 21}|{'-' * 13}|{'-' * 15}|")
    for name in methods:
        tps = tokens[name] / seconds[name]
        _, accepted, drafted = steps.get(name, ([], [], []))
        on_drafts = [a for a, d in zip(accepted, drafted) if d]
        per_step = f"{1 + sum(accepted) / len(accepted):.2f}" if accepted else "-"
        accept = f"{1 + sum(on_drafts) / len(on_drafts):.2f}" if on_drafts else "-"
        print(f"| {name:<34} | {tokens[name]:>6} | {tps:>6.1f} | {tps / greedy_tps:>8.2f}x | {identical[name]:>2}/{len(encoded):<16} "
              f"| {per_step:>11} | {accept:>13} |")
    for name, (sources, accepted, _) in steps.items():  # who supplied each step's accepted path
        if sources:
            by_source = accept_by_source(sources, accepted)
            print(f"{name}: " + "  ".join(f"{s} {v['share']:.0%} of steps (accept {v['accept_length']:.2f})" for s, v in by_source.items()))


if __name__ == "__main__":
    main()
