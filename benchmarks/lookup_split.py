"""How many draft nodes each source should get: heads' tree size x lookup chain length, per prompt set.

Every variant runs on the same prompts in one process, interleaved prompt by prompt after a
warm-up, next to HF greedy (the reference for speed and identity). A variant "T+L" is the first T
nodes of the shipped tree (listed best first) merged with a lookup chain of L tokens; T 0 is lookup
alone, L 0 the heads alone; "T+L/n" matches n-grams of at least n tokens (default 1); "T+Ls" drafts
L * n / 4 tokens after an n-token match (scale_by_match); "T+L@k" keeps only k heads' nodes after a match
of 2+ tokens (model_nodes_on_match). Usage:

  python benchmarks/lookup_split.py --heads runs/demo/heads --sets mt-bench,copy-heavy --limit 8 \
      --variants 0+8,16+0,16+4,16+8,16+16,8+8,16+8/2
"""

from __future__ import annotations

import argparse
import time

import torch

from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.decoder import medusa_generate, speculative_generate
from medusaforge.decoding.loading import hf_greedy, hf_prompt_lookup, load_for_decoding, stop_token_ids
from medusaforge.decoding.tree import default_tree
from medusaforge.drafters.hybrid import HybridProposer, accept_by_source
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.drafters.medusa_proposer import MedusaProposer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heads", default="runs/demo/heads")
    parser.add_argument("--sets", default="mt-bench,copy-heavy")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--variants", default="0+8,16+0,16+4,16+8,16+16,8+8,16+8/2", help="comma-separated TREE_NODES+LOOKUP_TOKENS[/MIN_NGRAM]")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    tokenizer, base, heads = load_for_decoding(args.model, args.heads, args.dtype, args.device)
    eos = stop_token_ids(tokenizer, base)
    tree = default_tree(heads.num_heads)
    methods = {"hf greedy": lambda ids, n: (hf_greedy(base, ids, n, eos), [], [])}
    methods["hf prompt lookup (10)"] = lambda ids, n: (hf_prompt_lookup(base, ids, n, eos, 10), [], [])
    for variant in args.variants.split(","):
        variant_sizes, _, on_match = variant.partition("@")
        sizes, _, min_ngram = variant_sizes.partition("/")
        nodes, lookup_tokens = sizes.split("+")
        count, scaled = int(lookup_tokens.rstrip("s")), lookup_tokens.endswith("s")
        lookup = LookupProposer(num_tokens=count, min_ngram=int(min_ngram or 1), scale_by_match=scaled) if count > 0 else None
        methods[variant] = make_method(base, heads, eos, tree[: int(nodes)], lookup, int(on_match) if on_match else None)

    dtype = str(next(base.parameters()).dtype).removeprefix("torch.")
    print(f"{dtype}, {torch.get_num_threads()} threads, default tree {len(tree)} nodes, {args.max_new_tokens} new tokens", flush=True)
    for prompt_set in args.sets.split(","):
        encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in load_prompts(prompt_set, args.limit)]
        for run in methods.values():  # warm-up
            run(encoded[0], 16)
        seconds, tokens, identical = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0), dict.fromkeys(methods, 0)
        sources, accepted = {name: [] for name in methods}, {name: [] for name in methods}
        for ids in encoded:
            reference = None
            for name, run in methods.items():
                start = time.perf_counter()
                out, step_sources, step_accepted = run(ids, args.max_new_tokens)
                seconds[name] += time.perf_counter() - start
                tokens[name] += len(out)
                sources[name] += step_sources
                accepted[name] += step_accepted
                reference = out if reference is None else reference
                identical[name] += out == reference
        greedy = tokens["hf greedy"] / seconds["hf greedy"]
        print(f"\n{prompt_set}: {len(encoded)} prompts")
        print("| variant (tree+lookup) | tok/s | vs greedy | accept | identical | accepted path from |")
        print("|---|---|---|---|---|---|")
        for name in methods:
            tps = tokens[name] / seconds[name]
            accept = sum(a + 1 for a in accepted[name]) / len(accepted[name]) if accepted[name] else float("nan")
            split = accept_by_source(sources[name], accepted[name]) if sources[name] else {}
            where = "  ".join(f"{s} {v['share']:.0%} ({v['accept_length']:.2f})" for s, v in split.items())
            print(f"| {name} | {tps:.1f} | {tps / greedy:.2f}x | {accept:.2f} | {identical[name]}/{len(encoded)} | {where} |", flush=True)


def make_method(base, heads, eos, tree, lookup, model_nodes_on_match):
    def run(ids, n):
        if lookup is not None and tree:
            proposer = HybridProposer(MedusaProposer(heads, tree), lookup, model_nodes_on_match=model_nodes_on_match)
            result = speculative_generate(base, proposer, ids, n, eos)
            return result.tokens, [source for source, _ in proposer.steps], result.accepted
        result = medusa_generate(base, heads, ids, n, eos, tree, lookup=lookup)
        sources = result.sources if lookup is not None else ["heads" if a else "none" for a in result.accepted]
        return result.tokens, sources, result.accepted

    return run


if __name__ == "__main__":
    main()
