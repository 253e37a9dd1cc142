"""vLLM on this machine's CPU runs our exports: plain greedy, our Medusa export, vLLM's ngram (and an
EAGLE-3 export when given), on the same prompts, in one table.

Runs inside the vLLM venv (benchmarks/serve_check.sh makes it and calls this); it imports vllm, not
medusaforge. Each mode runs in its own subprocess (one engine per process), first one prompt at a
time (batch 1, where speculation pays off), then all prompts as one batch.

  .venv-vllm/bin/python benchmarks/serve_check.py --base DIR --medusa DIR --prompts prompts.json

The table: loaded (the engine started with the drafter), identical (every greedy output equals
plain greedy's, token for token), mean accepted length (1 + accepted / drafts, the base model's own
token counted, from vLLM's spec-decode metrics), acceptance per draft position, tokens per second
one prompt at a time and batched, and each speed against plain greedy.

vLLM CPU settings that matter (printed with their values):
  VLLM_CPU_OMP_THREADS_BIND  which cores the OpenMP threads are pinned to ("auto": all the cores of
                             the NUMA node; on a shared machine, pin to free cores, or "all")
  VLLM_CPU_KVCACHE_SPACE     GiB reserved for the KV cache (vLLM's default 4; serve_check.sh sets 1,
                             45k tokens of SmolLM2's cache); must fit in RAM next to the model
  gpu_memory_utilization     on the CPU backend, the fraction of the NUMA node's memory vLLM reserves
                             (default 0.92, refused at start-up when other processes hold more);
                             --memory-fraction, 0.3 here
  dtype                      bfloat16 only where the CPU has native bf16 (avx512_bf16 or amx_bf16);
                             otherwise float32, as bf16 emulation is slower than fp32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("plain", "medusa", "ngram", "eagle3")


def cpu_bf16_flags() -> list[str]:
    """The CPU flags that give native bf16 matmuls (avx512_bf16: AVX-512 dot products; amx_bf16: AMX tiles)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(flags & {"avx512_bf16", "amx_bf16", "avx512f", "amx_tile"})


def default_dtype(flags: list[str]) -> str:
    """bfloat16 with native bf16 matmuls; elsewhere bf16 is emulated and slower than float32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(flags) else "float32"


def speculative_config(mode: str, args) -> dict | None:
    if mode == "plain":
        return None
    if mode == "ngram":
        return {"method": "ngram", "num_speculative_tokens": args.ngram_k,
                "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    folder = args.medusa if mode == "medusa" else args.eagle3
    config = json.loads((Path(folder) / "config.json").read_text())
    if mode == "medusa":
        k = args.k or config.get("num_heads") or config.get("medusa_num_heads")
        return {"method": "medusa", "model": str(folder), "num_speculative_tokens": k}
    return {"method": "eagle3", "model": str(folder), "num_speculative_tokens": args.eagle3_k}


def spec_counters(llm) -> dict:
    """Sum vLLM's spec-decode counters (names with or without the Prometheus `_total` suffix)."""
    totals: dict = {}
    for metric in llm.get_metrics():
        name = metric.name.removesuffix("_total")
        if not name.startswith("vllm:spec_decode_"):
            continue
        key = name.removeprefix("vllm:spec_decode_")
        if hasattr(metric, "values"):  # a vector: one count per draft position
            previous = totals.get(key, [0] * len(metric.values))
            totals[key] = [a + b for a, b in zip(previous, metric.values)]
        elif hasattr(metric, "value"):
            totals[key] = totals.get(key, 0) + metric.value
    return totals


def acceptance(before: dict, after: dict) -> dict:
    """Counter deltas over one measured pass -> mean accepted length and per-position acceptance."""
    def delta(key):
        now, then = after.get(key, 0), before.get(key, 0)
        if isinstance(now, list):
            return [a - b for a, b in zip(now, then or [0] * len(now))]
        return now - then

    drafts, accepted, per_position = delta("num_drafts"), delta("num_accepted_tokens"), delta("num_accepted_tokens_per_pos")
    return {"num_drafts": drafts, "num_accepted_tokens": accepted,
            "accept_length": 1 + accepted / drafts if drafts else None,
            "acceptance_per_position": [a / drafts for a in per_position] if drafts else []}


def run_mode(mode: str, args) -> dict:
    """One engine, one mode: warm up, decode one prompt at a time, then all as one batch."""
    from vllm import LLM, SamplingParams

    prompts = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in json.loads(Path(args.prompts).read_text())]
    prompts = prompts[: args.num_prompts]
    start = time.perf_counter()
    llm = LLM(model=args.base, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              speculative_config=speculative_config(mode, args), disable_log_stats=False,
              gpu_memory_utilization=args.memory_fraction,
              enforce_eager=args.enforce_eager)  # stats on: the spec-decode counters are only kept then
    load_seconds = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(texts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)  # warm-up
    report = {"mode": mode, "loaded": True, "load_seconds": load_seconds, "num_prompts": len(texts)}
    for name, batches in (("one_at_a_time", [[t] for t in texts]), ("batched", [texts])):
        before = spec_counters(llm)
        start = time.perf_counter()
        outputs = [out for batch in batches for out in llm.generate(batch, params, use_tqdm=False)]
        seconds = time.perf_counter() - start
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        report[name] = {"seconds": seconds, "generated_tokens": sum(map(len, tokens)),
                        "tokens_per_second": sum(map(len, tokens)) / seconds, "token_ids": tokens,
                        **(acceptance(before, spec_counters(llm)) if mode != "plain" else {})}
    return report


def run_in_subprocess(mode: str, args, workdir: Path, log_dir: Path) -> dict:
    out = workdir / f"{mode}.json"
    log = log_dir / f"{mode}.log"
    command = [sys.executable, __file__, "--only", mode, "--report", str(out)] + args.passthrough
    with open(log, "w") as handle:
        result = subprocess.run(command, text=True, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0 or not out.is_file():
        lines = log.read_text(errors="replace").splitlines()
        # The engine core fails in a child process; its own error comes before the parent's summary.
        errors = [line.strip() for line in lines if "Error" in line and "Engine core initialization failed" not in line]
        return {"mode": mode, "loaded": False, "error": (errors[-1] if errors else lines[-1] if lines else "no output"),
                "log": str(log)}
    return json.loads(out.read_text())


def table(reports: list[dict]) -> str:
    plain = next((r for r in reports if r["mode"] == "plain" and r.get("loaded")), None)
    rows = ["| mode | loaded | identical to plain greedy | mean accepted length | acceptance per position | "
            "tok/s one at a time | tok/s batched | vs plain (one / batched) |", "|" + "---|" * 8]
    for r in reports:
        if not r.get("loaded"):
            rows.append(f"| {r['mode']} | no: {r.get('error', '')[:160]} | | | | | | |")
            continue
        one, batched = r["one_at_a_time"], r["batched"]
        identical = "-" if plain is None else (
            f"{one['token_ids'] == plain['one_at_a_time']['token_ids']} / {batched['token_ids'] == plain['batched']['token_ids']}")
        length = f"{one['accept_length']:.3f}" if one.get("accept_length") else "-"
        per_position = ", ".join(f"{a:.3f}" for a in one.get("acceptance_per_position", [])) or "-"
        ratio = "-" if plain is None else (f"{one['tokens_per_second'] / plain['one_at_a_time']['tokens_per_second']:.2f}x / "
                                           f"{batched['tokens_per_second'] / plain['batched']['tokens_per_second']:.2f}x")
        rows.append(f"| {r['mode']} | yes | {identical} | {length} | {per_position} | "
                    f"{one['tokens_per_second']:.1f} | {batched['tokens_per_second']:.1f} | {ratio} |")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="Hugging Face folder of the base model the heads were trained on")
    parser.add_argument("--medusa", help="our export, `medusaforge export --format vllm`")
    parser.add_argument("--eagle3", help="an EAGLE-3 export (a row is added when given)")
    parser.add_argument("--prompts", required=True, help="JSON list of prompts (strings or chat message lists)")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=0, help="Medusa num_speculative_tokens (0: every head)")
    parser.add_argument("--ngram-k", type=int, default=4)
    parser.add_argument("--eagle3-k", type=int, default=3)
    parser.add_argument("--dtype", default=default_dtype(cpu_bf16_flags()), help="default: bfloat16 with native bf16, else float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--memory-fraction", type=float, default=0.3,
                        help="vLLM's gpu_memory_utilization: on a CPU, the share of RAM it reserves")
    parser.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="skip torch.compile (minutes of start-up on a small CPU)")
    parser.add_argument("--out", type=Path, help="write every report (with token ids) as JSON here")
    parser.add_argument("--only", choices=MODES, help=argparse.SUPPRESS)  # one mode, in a subprocess
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for flag in ("--out",):
        if flag in args.passthrough:
            i = args.passthrough.index(flag)
            del args.passthrough[i: i + 2]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.only:
        report = run_mode(args.only, args)
        args.report.write_text(json.dumps(report))
        return 0
    settings = {"VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto (default)"),
                "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4 GiB (default)"),
                "gpu_memory_utilization": args.memory_fraction,
                "dtype": args.dtype, "cpu_bf16_flags": cpu_bf16_flags() or "none (bf16 would be emulated)",
                "cores": os.cpu_count(), "enforce_eager": args.enforce_eager}
    print("vLLM CPU settings:", json.dumps(settings))
    modes = ["plain", "ngram"] + (["medusa"] if args.medusa else []) + (["eagle3"] if args.eagle3 else [])
    reports = []
    with tempfile.TemporaryDirectory() as workdir:
        log_dir = args.out.parent if args.out else Path(workdir)
        log_dir.mkdir(parents=True, exist_ok=True)
        for mode in modes:
            start = time.perf_counter()
            reports.append(run_in_subprocess(mode, args, Path(workdir), log_dir))
            print(f"{mode}: {'loaded' if reports[-1].get('loaded') else 'FAILED'} in {time.perf_counter() - start:.0f} s",
                  flush=True)
            print(table(reports).splitlines()[-1], flush=True)  # the row so far, in case a later mode never ends
    print(f"\n{reports[0].get('num_prompts', args.num_prompts)} MT-Bench first turns, greedy, "
          f"max {args.max_tokens} new tokens, {args.dtype}:\n")
    print(table(reports))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"settings": settings, "reports": reports}, indent=1) + "\n")
    return 0 if all(r.get("loaded") for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
