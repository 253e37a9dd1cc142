"""Per-step cost of Medusa heads at batch 1 in vLLM: vLLM 0.32's own class on a widened export
against the plugin's TruncatedMedusa (medusaforge/serving/vllm/truncated_medusa.py). The two
compute paths are written out here in plain torch: ResBlock, projection and argmax per head. The
plugin also adds the -inf row and the scatter through token_map that vLLM's proposer takes the
argmax of. Random weights at the given shapes (default SmolLM2-135M with the demo's 8,192-token
heads). Medians over `--steps` calls.

  .venv/bin/python benchmarks/head_projection_cost.py [--threads 1] [--steps 100]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn import functional as F


def median_ms(step, steps: int) -> float:
    for _ in range(20):  # warm-up
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--head-vocab", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="vLLM's CPU worker runs torch with 1 thread on this host")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for dtype in (torch.bfloat16, torch.float32):
        blocks = [(torch.randn(args.hidden, args.hidden, dtype=dtype) * 0.02, torch.randn(args.hidden, dtype=dtype))
                  for _ in range(args.heads)]
        wide = [torch.randn(args.vocab, args.hidden, dtype=dtype) for _ in range(args.heads)]
        token_map = torch.sort(torch.randperm(args.vocab)[: args.head_vocab]).values
        narrow = [w[token_map].contiguous() for w in wide]
        x = torch.randn(1, args.hidden, dtype=dtype)

        def widened():  # vLLM's Medusa: full-vocabulary rows per head
            return [F.linear(x + F.silu(F.linear(x, w, b)), rows).argmax(-1) for (w, b), rows in zip(blocks, wide)]

        def truncated():  # TruncatedMedusa: the trained rows, scattered into a -inf row for the proposer
            out = []
            for (w, b), rows in zip(blocks, narrow):
                logits = F.linear(x + F.silu(F.linear(x, w, b)), rows)
                out.append(logits.new_full((1, args.vocab), -torch.inf).index_copy_(-1, token_map, logits).argmax(-1))
            return out

        before, after = median_ms(widened, args.steps), median_ms(truncated, args.steps)
        print(f"{str(dtype).removeprefix('torch.'):9s} {args.heads} heads: widened {before:.2f} ms, truncated {after:.2f} ms "
              f"per step ({before / after:.1f}x less)")


if __name__ == "__main__":
    main()
