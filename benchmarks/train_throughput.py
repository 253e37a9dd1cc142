"""Training throughput and peak memory of the Medusa head loss: plain vs ours, online vs offline.

Variants, each on the same batches and each in a fresh subprocess (so peak RSS is its own):
  plain    full [B, T, vocab] logits per head, then mean cross entropy (loss.materialized_head_losses),
           as most tutorials write it; online (the base model runs every step)
  online   ours (loss.medusa_head_losses: target tokens only, chunked, gradients in forward); the
           base model runs every step
  offline  ours, hidden states read from a `medusaforge cache` folder; no base model

Problems:
  smollm2    the built-in SmolLM2-135M-Instruct (hidden 576, vocab 49152), real chat data
  synthetic  a Llama-3-shaped head problem: hidden 4096, vocab 128256, 4 heads with a ResBlock each
             and the base lm_head as their (frozen, bf16) projection, random hidden states; there is
             no base model, so only plain vs ours on given hidden states (= offline)

A step is forward + backward + AdamW step of the heads. Memory on CPU: VmRSS after setup (weights,
optimizer state and gradient buffers allocated by a warm-up step), and the peak RSS during the
timed steps (VmHWM, reset after setup through /proc/self/clear_refs); their difference is what
the loss needs. On CUDA: torch.cuda.max_memory_allocated over the steps.

  python benchmarks/train_throughput.py --problem smollm2 --data runs/exp/distill480.jsonl
  python benchmarks/train_throughput.py --problem synthetic --tokens 512
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch


def rss_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1)) / 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def autocast_context(device: torch.device):
    from medusaforge.training.common import autocast_for

    return autocast_for(device, "auto")


# ---- problems: each returns (heads, list of per-step callables that give (hidden, ids, mask), tokens) ----


def smollm2_problem(args, variant: str, device):
    from medusaforge.training.sources import OfflineBatches, OnlineBatches
    from medusaforge.data.conversations import load_tokenized
    from medusaforge.drafters.medusa_heads import MedusaHeads
    from medusaforge.models import load_base_model, load_tokenizer, read_lm_head_weight
    from medusaforge.training.hidden_cache import HiddenCache

    if variant == "offline":
        cache = HiddenCache(args.cache)
        source, data = OfflineBatches(cache), cache.data
        lm_head_weight = read_lm_head_weight(args.model)
    else:
        tokenizer = load_tokenizer(args.model)
        base = load_base_model(args.model, device=device).requires_grad_(False)
        data = load_tokenized(args.data, tokenizer, args.max_length, log=lambda m: None)
        source = OnlineBatches(base, data, tokenizer.pad_token_id)
        lm_head_weight = base.lm_head.weight
    heads = MedusaHeads(lm_head_weight.shape[1], lm_head_weight.shape[0], args.num_heads)
    heads.init_from_base(lm_head_weight)
    # The same batches for every variant: consecutive conversations in file order.
    batches = [list(range(start, start + args.batch_size)) for start in range(0, len(data) - args.batch_size + 1, args.batch_size)]
    batches = batches[: args.warmup + args.steps]

    def batch_at(step):
        batch = {k: v.to(device) for k, v in source.collate(batches[step]).items()}
        return batch, int(batch["attention_mask"].sum())

    return heads.to(device), source, batch_at


def synthetic_problem(args, variant: str, device):
    from medusaforge.drafters.medusa_heads import MedusaHeads

    hidden_size, vocab_size = 4096, 128256
    heads = MedusaHeads(hidden_size, vocab_size, args.num_heads, shared_lm_head=True).to(device)
    # bf16 like Llama-3's lm_head; filled in place so no fp32 copy ever exists.
    lm_head_weight = torch.empty(vocab_size, hidden_size, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
    heads.init_from_base(lm_head_weight)
    generator = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(args.warmup + args.steps):
        hidden = torch.randn(1, args.tokens, hidden_size, generator=generator).to(torch.bfloat16)
        ids = torch.randint(0, vocab_size, (1, args.tokens), generator=generator)
        steps.append({"hidden": hidden, "input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool),
                      "attention_mask": torch.ones_like(ids)})

    class GivenHidden:
        def hidden_states(self, batch):
            return batch["hidden"]

    def batch_at(step):
        return {k: v.to(device) for k, v in steps[step].items()}, args.tokens

    return heads, GivenHidden(), batch_at


def run_variant(args) -> dict:
    from medusaforge.training.loss import default_head_weights, materialized_head_losses, medusa_head_losses

    torch.manual_seed(0)
    device = torch.device(args.device)
    problem = smollm2_problem if args.problem == "smollm2" else synthetic_problem
    heads, source, batch_at = problem(args, args.variant, device)
    autocast = autocast_context(device)
    weights = default_head_weights(heads.num_heads)
    trainable = [p for p in heads.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def train_step(step: int) -> tuple[int, float]:
        batch, num_tokens = batch_at(step)
        with autocast:
            hidden = source.hidden_states(batch)
            if args.variant == "plain":
                losses = materialized_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"])
            else:
                result = medusa_head_losses(heads, hidden, batch["input_ids"], batch["loss_mask"], args.chunk_size)
                losses = [s / c.clamp(min=1) for s, c in zip(result.loss_sums, result.counts)]
            loss = sum(w * l for w, l in zip(weights, losses))
        loss.backward()
        optimizer.step()
        # Gradient buffers stay allocated (zeroed), so they count in the RSS after setup and
        # "peak - setup" is what the loss itself needs, the same for every variant.
        optimizer.zero_grad(set_to_none=False)
        return num_tokens, float(loss)  # float(): a sync point, so the step is really done

    for step in range(args.warmup):
        train_step(step)
    setup_rss = rss_mib("VmRSS")
    reset_peak_memory(device)
    tokens, losses = 0, []
    started = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        num_tokens, loss = train_step(step)
        tokens += num_tokens
        losses.append(loss)
    elapsed = time.perf_counter() - started
    result = {"problem": args.problem, "variant": args.variant, "tokens": tokens, "seconds": round(elapsed, 2),
              "tokens_per_s": round(tokens / elapsed, 1), "losses": [round(l, 4) for l in losses]}
    if device.type == "cuda":
        result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    else:
        result["rss_after_setup_mib"] = round(setup_rss, 1)
        result["peak_rss_mib"] = round(rss_mib("VmHWM"), 1)
        result["loss_memory_mib"] = round(result["peak_rss_mib"] - setup_rss, 1)
    return result


def ensure_cache(args) -> None:
    """Build the SmolLM2 cache once (timed), with the same max_length as the online variants."""
    from medusaforge.commands.cache import CacheConfig, INDEX_FILE
    from medusaforge.commands.cache import run as build_cache

    if (Path(args.cache) / INDEX_FILE).is_file() and json.loads((Path(args.cache) / INDEX_FILE).read_text()).get("complete"):
        return
    started = time.perf_counter()
    build_cache(CacheConfig(model=args.model, data=Path(args.data), out=Path(args.cache), max_length=args.max_length,
                            batch_size=args.batch_size, overwrite=True))
    print(f"cache built in {time.perf_counter() - started:.1f}s", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", choices=["smollm2", "synthetic"], default="smollm2")
    parser.add_argument("--variants", nargs="+", default=None, help="default: plain online offline (synthetic: plain offline)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the per-variant subprocess
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="runs/exp/distill480.jsonl")
    parser.add_argument("--cache", default="runs/bench/smollm2-cache")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512, help="synthetic: tokens per step (all of them targets)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json-out", default=None, help="also write the results here")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    variants = args.variants or (["plain", "online", "offline"] if args.problem == "smollm2" else ["plain", "offline"])
    if args.problem == "smollm2" and "offline" in variants:
        ensure_cache(args)
    forwarded = []
    for name, value in vars(args).items():
        if name not in ("variants", "variant", "json_out"):
            forwarded += [f"--{name.replace('_', '-')}", str(value)]
    results = []
    for variant in variants:
        command = [sys.executable, __file__, *forwarded, "--variant", variant]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            print(completed.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"variant {variant} failed")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)

    print(f"\n{args.problem}: {args.num_heads} heads, device {args.device}, {args.steps} timed steps after {args.warmup} warm-up, chunk {args.chunk_size}")
    memory_key = "peak_allocated_mib" if args.device.startswith("cuda") else "loss_memory_mib"
    print(f"| variant | tokens/s | {'peak allocated MiB' if memory_key == 'peak_allocated_mib' else 'peak RSS MiB | RSS after setup MiB | peak - setup MiB'} | losses |")
    print("|---|---|---|" + ("" if memory_key == "peak_allocated_mib" else "---|---|"))
    for r in results:
        memory = str(r[memory_key]) if memory_key == "peak_allocated_mib" else f"{r['peak_rss_mib']} | {r['rss_after_setup_mib']} | {r['loss_memory_mib']}"
        print(f"| {r['variant']} | {r['tokens_per_s']} | {memory} | {r['losses']} |")
    by_name = {r["variant"]: r for r in results}
    if "plain" in by_name:
        for name in ("online", "offline"):
            if name in by_name:
                print(f"{name} vs plain: throughput x{by_name[name]['tokens_per_s'] / by_name['plain']['tokens_per_s']:.2f}, "
                      f"loss memory x{by_name[name][memory_key] / max(1e-9, by_name['plain'][memory_key]):.3f}")
    if "online" in by_name and "offline" in by_name:
        print(f"offline vs online (ours): throughput x{by_name['offline']['tokens_per_s'] / by_name['online']['tokens_per_s']:.2f}")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
