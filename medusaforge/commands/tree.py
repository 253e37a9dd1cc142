"""`medusaforge tree`: a sparse candidate tree fitted to the heads and to the host, or none.

The search itself is in decoding/tree_search.py: measured joint path accuracies give the best tree
of each size, the real decode step is timed at every size and as a plain step, interleaved and
repeated, a robust cost line is fitted, and the size with the most expected tokens per second wins.
When no tree beats plain decoding the tree file says so ("paths": []), and generate and eval then
decode without drafting.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.config import option
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.cost import drafted_step_seconds
from medusaforge.decoding.decoder import medusa_generate
from medusaforge.decoding.eagle_tree_search import run_search
from medusaforge.decoding.loading import hf_greedy, load_for_decoding, stop_token_ids
from medusaforge.decoding.tree import save_tree
from medusaforge.decoding.tree_search import (
    choose_tree,
    expected_accept_length_from_frequencies,
    grow_tree_from_frequencies,
    path_frequencies,
    time_steps,
    truth_ranks,
)
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.models import DEFAULT_MODEL


@dataclass
class TreeSearchConfig:
    """Search the sparse candidate tree that maximises expected tokens/s on this device."""

    model: str = option(DEFAULT_MODEL, "base model: built-in name, local folder or hub id")
    heads: Path = option(Path("runs/demo/heads"), "heads folder (a train --out folder or its heads/ subfolder)")
    prompts: str | None = option(None, "calibration prompts file (.jsonl / .txt), or 'mt-bench'; use prompts you will not evaluate on")
    limit: int = option(8, "calibration prompts to use (0 = all)")
    calibration_tokens: int = option(96, "greedy tokens the base writes per calibration prompt")
    max_rank: int = option(8, "candidates per head considered (top-k)")
    sizes: list[int] = option([1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64], "tree sizes (candidate nodes) to time")
    repeats: int = option(7, "timing rounds; each round times every size and a plain step once, in rotating order")
    measure_prompts: int = option(4, "prompts decoded with the chosen tree to check the expected acceptance (0 = skip)")
    dtype: str = option("auto", "bf16, fp32 or auto (bf16 where the hardware runs it natively, else fp32)", choices=["auto", "bf16", "fp32", "fp16"])
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    out: Path = option(Path("tree.json"), "where to write the chosen tree")
    allow_other_base: bool = option(False, "use heads trained against different base weights")
    drafter: Path | None = option(None, "an EAGLE-3 draft folder instead of --heads: search its dynamic tree's top-k, "
                                        "depth and node count (--sizes) for tokens per second")
    eagle_topks: list[int] = option([4, 8], "with an EAGLE-3 --drafter: top-k values to try")
    eagle_depths: list[int] = option([3, 5], "with an EAGLE-3 --drafter: depths to try")

    def validate(self) -> None:
        if self.prompts is None:
            raise ValueError("--prompts is required: calibration prompts like the ones the heads will serve (not the evaluation set)")


def run(config: TreeSearchConfig) -> dict:
    eagle3 = find_eagle3_folder(config.drafter)
    if eagle3 is not None:
        return run_search(config.model, eagle3, config.prompts, config.limit, config.calibration_tokens, config.eagle_topks,
                          config.eagle_depths, config.sizes, config.repeats, config.dtype, config.device, config.out)
    tokenizer, base, heads = load_for_decoding(config.model, config.heads, config.dtype, config.device, config.allow_other_base)
    eos = stop_token_ids(tokenizer, base)
    chats = load_prompts(config.prompts, config.limit)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in chats]

    print(f"tree: measuring head accuracy on {len(chats)} prompts x {config.calibration_tokens} greedy tokens", flush=True)
    rank_paths, sequences = [], []
    for ids in encoded:
        continuation = hf_greedy(base, ids, config.calibration_tokens, eos)
        sequence = torch.cat([ids, torch.tensor(continuation, dtype=torch.long, device=ids.device)])
        sequences.append(sequence)
        rank_paths.append(truth_ranks(base, heads, sequence, len(ids), config.max_rank))
    ranks = torch.cat(rank_paths)  # [positions, num_heads]
    frequencies = path_frequencies(ranks)
    accuracies = [[float((ranks[:, k] == r).float().mean()) for r in range(config.max_rank)] for k in range(heads.num_heads)]
    for k, row in enumerate(accuracies):
        print(f"  head {k}: top-1 {row[0]:.3f}  top-{config.max_rank} {sum(row):.3f}  (alone; the tree uses joint path accuracies)")

    trees = {0: []}
    for size in config.sizes:
        paths = grow_tree_from_frequencies(frequencies, size)
        trees.setdefault(len(paths), paths)  # fewer distinct nodes than asked: the same tree again
    expected = {size: expected_accept_length_from_frequencies(paths, frequencies) for size, paths in trees.items() if size}
    # Time at a realistic prefix: a calibration prompt plus half its continuation.
    prefix = sequences[0][: len(encoded[0]) + config.calibration_tokens // 2]
    print(f"timing {len(trees)} step kinds x {config.repeats} interleaved rounds", flush=True)
    timings = time_steps(base, heads, trees, prefix, config.repeats)
    chosen, cost, plain = choose_tree(expected, timings)
    print(f"plain one-token step: median {plain * 1000:.1f} ms ({1 / plain:.1f} tok/s); "
          f"fitted draft step: {cost.fixed * 1000:.1f} ms + {cost.per_node * 1000:.2f} ms per node")
    print(f"{'nodes':>5} {'depth':>5} {'E[accept]':>9} {'median ms':>9} {'fit ms':>7} {'E[tok/s]':>8} {'E[speedup]':>10}")
    rows = []
    for size, paths in trees.items():
        accept = expected.get(size, 1.0)
        step = drafted_step_seconds(cost, size, plain) if size else plain
        rows.append({"nodes": size, "depth": max(map(len, paths), default=0), "expected_accept_length": accept,
                     "median_step_ms": statistics.median(timings[size]) * 1000, "fitted_step_ms": step * 1000,
                     "expected_tokens_per_s": accept / step, "paths": paths})
        row = rows[-1]
        print(f"{size:>5} {row['depth']:>5} {accept:>9.2f} {row['median_step_ms']:>9.1f} {step * 1000:>7.1f} "
              f"{accept / step:>8.1f} {accept / step * plain:>9.2f}x", flush=True)
    best = next(row for row in rows if row["nodes"] == chosen)
    device_name = torch.cuda.get_device_name() if base.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    metadata = dict(
        num_nodes=chosen, expected_accept_length=round(best["expected_accept_length"], 3),
        step_ms=round(best["fitted_step_ms"], 3), plain_step_ms=round(plain * 1000, 3),
        step_cost={"fixed_ms": round(cost.fixed * 1000, 3), "per_node_ms": round(cost.per_node * 1000, 4)},
        expected_speedup=round(best["expected_tokens_per_s"] * plain, 3), device=device_name,
        dtype=str(next(base.parameters()).dtype).removeprefix("torch."),
        accuracies=[[round(a, 4) for a in row] for row in accuracies],
    )
    if chosen == 0:
        metadata = {"note": "no tree beat plain decoding on this host: generate and eval decode without drafting", **metadata}
    save_tree(best["paths"], config.out, **metadata)
    if chosen == 0:
        print(f"chose no drafting: no tree beats a plain step here; wrote {config.out}")
    else:
        print(f"chose {chosen} nodes (depth {best['depth']}): expected accept length {best['expected_accept_length']:.2f}, "
              f"expected {best['expected_tokens_per_s']:.1f} tok/s ({metadata['expected_speedup']:.2f}x plain); wrote {config.out}")

    summary = {"accuracies": accuracies, "sizes": rows, "chosen": best, "plain_step_ms": plain * 1000,
               "step_cost_ms": (cost.fixed * 1000, cost.per_node * 1000)}
    if config.measure_prompts > 0 and chosen > 0:
        accepted = []
        for ids in encoded[: config.measure_prompts]:
            accepted += medusa_generate(base, heads, ids, config.calibration_tokens, eos, best["paths"]).accepted
        measured = sum(a + 1 for a in accepted) / max(len(accepted), 1)
        summary["measured_accept_length"] = measured
        print(f"accept length: expected {best['expected_accept_length']:.2f}, measured {measured:.2f} "
              f"({len(accepted)} steps on {min(config.measure_prompts, len(encoded))} calibration prompts)")
    return summary
