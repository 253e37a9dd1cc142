"""`medusaforge tree`: a sparse candidate tree fitted to the heads and to the hardware at hand.

1. Accuracy: on calibration prompts the base writes its own greedy continuation; at every position
   we record the rank of the right token in each head's top-k. A tree node's acceptance rate is
   the share of positions whose ranks match its whole path (joint, so correlated heads are fine).
2. Growth: for each size, the tree maximising expected acceptance (the most often accepted nodes).
3. Cost: one decode step (head candidates + one verify forward over the tree) is timed at every
   size on this device; the tree kept maximises expected tokens per *second*. A tree that pays on
   a GPU, where 64 nodes cost about as much as 1, is far too big for a 2-core CPU.
4. Check: Medusa decoding with the chosen tree reports the measured acceptance next to the expected.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.config import option
from medusaforge.decoding.decoder import head_candidates, medusa_generate, new_cache, run_decoder
from medusaforge.commands.eval import hf_greedy
from medusaforge.commands.generate import load_for_decoding, stop_token_ids
from medusaforge.models import DEFAULT_MODEL, final_hidden_states, lm_head_of
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.tree import (
    build_tree_buffers,
    expected_accept_length_from_frequencies,
    grow_tree_from_frequencies,
    path_frequencies,
    save_tree,
    tree_tokens,
    verify_attention_mask,
)


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
    repeats: int = option(5, "timed repetitions per size (the median is used)")
    measure_prompts: int = option(4, "prompts decoded with the chosen tree to check the expected acceptance (0 = skip)")
    dtype: str = option("auto", "bf16, fp32 or auto (bf16 where the hardware runs it natively, else fp32)", choices=["auto", "bf16", "fp32", "fp16"])
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    out: Path = option(Path("tree.json"), "where to write the chosen tree")
    allow_other_base: bool = option(False, "use heads trained against different base weights")

    def validate(self) -> None:
        if self.prompts is None:
            raise ValueError("--prompts is required: calibration prompts like the ones the heads will serve (not the evaluation set)")


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


@torch.inference_mode()
def time_decode_step(base, heads, paths, prefix: torch.Tensor, repeats: int) -> float:
    """Median seconds of one Medusa step (head candidates + verify forward + lm_head) after `prefix`."""
    buffers = build_tree_buffers(paths).to(prefix.device)
    decoder, lm_head = base.get_decoder(), lm_head_of(base)
    cache = new_cache(base)
    hidden = run_decoder(decoder, prefix[None], torch.arange(len(prefix), device=prefix.device)[None], cache)[0, -1]
    length = len(prefix)
    mask = verify_attention_mask(buffers, length, lm_head.weight.dtype)
    positions = (length + buffers.depths)[None]
    times = []
    for _ in range(repeats + 1):  # the first run warms up kernels for this shape
        start = time.perf_counter()
        candidates = head_candidates(heads, hidden, buffers.topk, buffers.max_depth)
        tokens = tree_tokens(prefix[-1], candidates, buffers)
        lm_head(run_decoder(decoder, tokens[None], positions, cache, mask)[0]).argmax(dim=-1).tolist()
        times.append(time.perf_counter() - start)
        for layer in cache.layers:  # drop the tree's KV entries again
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
    return statistics.median(times[1:])


@torch.inference_mode()
def time_plain_step(base, prefix: torch.Tensor, repeats: int) -> float:
    """Median seconds of one ordinary one-token decode step (forward + lm_head) after `prefix`."""
    decoder, lm_head = base.get_decoder(), lm_head_of(base)
    cache = new_cache(base)
    run_decoder(decoder, prefix[None], torch.arange(len(prefix), device=prefix.device)[None], cache)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        step = run_decoder(decoder, prefix[-1:][None], torch.tensor([[len(prefix)]], device=prefix.device), cache)
        lm_head(step[0]).argmax(dim=-1).tolist()
        times.append(time.perf_counter() - start)
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., : len(prefix), :], layer.values[..., : len(prefix), :]
    return statistics.median(times[1:])


def run(config: TreeSearchConfig) -> dict:
    tokenizer, base, heads = load_for_decoding(config.model, config.heads, config.dtype, config.device, config.allow_other_base)
    eos = stop_token_ids(tokenizer, base)
    chats = load_prompts(config.prompts, config.limit)
    encoded = [encode_prompt(tokenizer, chat).to(base.device) for chat in chats]

    print(f"tree: measuring head accuracy on {len(chats)} prompts x {config.calibration_tokens} greedy tokens", flush=True)
    rank_paths, sequences = [], []
    for ids in encoded:
        continuation = hf_greedy(base, ids, config.calibration_tokens, eos)
        sequence = torch.cat([ids, torch.tensor(continuation, device=ids.device)])
        sequences.append(sequence)
        rank_paths.append(truth_ranks(base, heads, sequence, len(ids), config.max_rank))
    ranks = torch.cat(rank_paths)  # [positions, num_heads]
    frequencies = path_frequencies(ranks)
    accuracies = [[float((ranks[:, k] == r).float().mean()) for r in range(config.max_rank)] for k in range(heads.num_heads)]
    for k, row in enumerate(accuracies):
        print(f"  head {k}: top-1 {row[0]:.3f}  top-{config.max_rank} {sum(row):.3f}  (alone; the tree uses joint path accuracies)")

    # Time at a realistic prefix: a calibration prompt plus half its continuation.
    prefix = sequences[0][: len(encoded[0]) + config.calibration_tokens // 2]
    plain = time_plain_step(base, prefix, config.repeats)
    print(f"plain one-token step: {plain * 1000:.1f} ms ({1 / plain:.1f} tok/s)")
    print(f"{'nodes':>5} {'depth':>5} {'E[accept]':>9} {'step ms':>8} {'E[tok/s]':>8} {'E[speedup]':>10}")
    rows = []
    for size in config.sizes:
        paths = grow_tree_from_frequencies(frequencies, size)
        expected = expected_accept_length_from_frequencies(paths, frequencies)
        step = time_decode_step(base, heads, paths, prefix, config.repeats)
        rows.append({"nodes": len(paths), "depth": max(map(len, paths)), "expected_accept_length": expected,
                     "step_ms": step * 1000, "expected_tokens_per_s": expected / step, "paths": paths})
        row = rows[-1]
        print(f"{row['nodes']:>5} {row['depth']:>5} {expected:>9.2f} {step * 1000:>8.1f} {expected / step:>8.1f} {expected / step * plain:>9.2f}x", flush=True)
    best = max(rows, key=lambda r: r["expected_tokens_per_s"])
    device_name = torch.cuda.get_device_name() if base.device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    save_tree(
        best["paths"], config.out,
        num_nodes=best["nodes"], expected_accept_length=round(best["expected_accept_length"], 3),
        step_ms=round(best["step_ms"], 2), plain_step_ms=round(plain * 1000, 2),
        expected_speedup=round(best["expected_tokens_per_s"] * plain, 3), device=device_name,
        dtype=str(next(base.parameters()).dtype).removeprefix("torch."),
        accuracies=[[round(a, 4) for a in row] for row in accuracies],
    )
    print(f"chose {best['nodes']} nodes (depth {best['depth']}): expected accept length {best['expected_accept_length']:.2f}, "
          f"expected {best['expected_tokens_per_s']:.1f} tok/s; wrote {config.out}")

    summary = {"accuracies": accuracies, "sizes": rows, "chosen": best, "plain_step_ms": plain * 1000}
    if config.measure_prompts > 0:
        accepted = []
        for ids in encoded[: config.measure_prompts]:
            accepted += medusa_generate(base, heads, ids, config.calibration_tokens, eos, best["paths"]).accepted
        measured = sum(a + 1 for a in accepted) / max(len(accepted), 1)
        summary["measured_accept_length"] = measured
        print(f"accept length: expected {best['expected_accept_length']:.2f}, measured {measured:.2f} "
              f"({len(accepted)} steps on {min(config.measure_prompts, len(encoded))} calibration prompts)")
    return summary
