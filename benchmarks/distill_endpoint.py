"""Distill through vLLM's OpenAI-compatible server against the built-in distill, on the same prompts:
replies/s and tokens/s of each, and how many replies are the same.

  .venv/bin/python benchmarks/distill_endpoint.py --num-prompts 200            # the measurement
  .venv/bin/python benchmarks/distill_endpoint.py --modes vllm --no-overwrite  # make distill-vllm

Runs in medusaforge's venv. The vllm mode starts the server from .venv-vllm on a free port
(benchmarks/vllm_server.py), runs `distill --endpoint` against it and stops it whatever happens;
--endpoint URL uses a server already running instead. The modes run one after the other, never
at the same time, both greedy with the same max tokens, in the same dtype (bf16 where the CPU
runs it natively, else fp32: the built-in distill's `auto`). The endpoint's time excludes the
server's start-up (reported apart: a server is started once for many runs); the built-in's
includes loading the model (seconds for SmolLM2). Tokens are counted the same way for both: the
written replies re-tokenized with the model's tokenizer.

Where two greedy replies part, the base model (fp32, in this process) scores the two tokens chosen
at the first difference: a small logit margin is a near-tie that two engines' rounding may break
either way; a large one is a real disagreement (other weights, template or sampling settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_server import vllm_server  # noqa: E402

from medusaforge.commands import distill  # noqa: E402
from medusaforge.data.distilled import done_keys, prompt_of, read_distilled  # noqa: E402
from medusaforge.models import load_base_model, load_tokenizer, resolve_device, resolve_dtype, resolve_model_path  # noqa: E402

MODES = ("vllm", "builtin")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (built-in name or local folder)")
    parser.add_argument("--prompts", default="chitchat", help="distill's --prompts: built-in sources or a JSONL file")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (vllm mode)")
    parser.add_argument("--batch-size", type=int, default=32, help="generation batch (builtin mode)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, in order: vllm, builtin")
    parser.add_argument("--endpoint", default="", help="use this running server instead of starting vLLM")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/distill-endpoint"))
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=True,
                        help="start each output afresh (--no-overwrite: the vllm mode resumes its file)")
    parser.add_argument("--start-timeout", type=float, default=300, help="seconds for vLLM's server to come up")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}; expected some of {', '.join(MODES)}")
    return args


def distill_config(args, mode: str, out: Path) -> distill.DistillConfig:
    return distill.DistillConfig(
        model=args.model, prompts=args.prompts, out=out, num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, dtype=args.dtype, overwrite=args.overwrite or mode == "builtin",
        concurrency=args.concurrency, device="cpu", progress=True)


def measure(args, mode: str, url: str = "") -> dict:
    """Run one mode's distill; its wall time and what it wrote in that time (a resumed file's earlier
    replies are not counted)."""
    out = args.out_dir / f"{mode}.jsonl"
    config = distill_config(args, mode, out)
    config.endpoint = url
    earlier = set() if config.overwrite or not out.exists() else set(done_keys(read_distilled(out)))
    started = time.perf_counter()
    distill.run(config)
    seconds = time.perf_counter() - started
    everything = read_distilled(out)
    records = [record for key, record in zip(done_keys(everything), everything) if key not in earlier]
    tokenizer = load_tokenizer(args.model)
    tokens = sum(len(tokenizer(r["conversations"][-1]["value"], add_special_tokens=False)["input_ids"]) for r in records)
    return {"mode": mode, "out": str(out), "replies": len(records), "reply_tokens": tokens, "seconds": seconds,
            "replies_per_second": len(records) / seconds, "tokens_per_second": tokens / seconds,
            "finished": sum(r["finished"] for r in records)}


def first_difference(a: list[int], b: list[int], eos: int) -> tuple[int, int, int]:
    """Two token lists -> (position, a's token, b's token) where they first part; a list that ends
    first chose end-of-turn there."""
    position = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return position, (a + [eos])[position], (b + [eos])[position]


def partings(model: str, first: list[dict], second: list[dict]) -> tuple[int, int, list[dict]]:
    """Two distill files' records -> (prompts both answer, same replies, one entry per parting: the
    prompt, the token position, both tokens and the base's fp32 logit margin between them there)."""
    replies = [dict(zip(done_keys(records), records)) for records in (first, second)]
    common = [key for key in replies[0] if key in replies[1]]
    parted = [key for key in common if replies[0][key]["conversations"][-1] != replies[1][key]["conversations"][-1]]
    if not parted:
        return len(common), len(common), []
    tokenizer = load_tokenizer(model)
    base = load_base_model(model, dtype=torch.float32, device=torch.device("cpu"), check=False)
    found = []
    for key in parted:
        prompt = prompt_of(replies[0][key])
        a, b = (tokenizer(r[key]["conversations"][-1]["value"], add_special_tokens=False)["input_ids"] for r in replies)
        position, token_a, token_b = first_difference(a, b, tokenizer.eos_token_id)
        rendered = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        context = tokenizer(rendered, add_special_tokens=False)["input_ids"] + a[:position]
        with torch.no_grad():
            logits = base(torch.tensor([context])).logits[0, -1].float()
        found.append({"prompt": prompt[-1]["content"][:80], "position": position, "first": tokenizer.decode([token_a]),
                      "second": tokenizer.decode([token_b]), "first_id": token_a, "second_id": token_b, "logit_margin": abs(float(logits[token_a] - logits[token_b]))})
    return len(common), len(common) - len(parted), found


def table(reports: list[dict]) -> str:
    rows = ["| mode | replies | reply tokens | ended at end-of-turn | seconds | replies/s | tok/s | start-up s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in reports:
        rows.append(f"| {r['mode']} | {r['replies']} | {r['reply_tokens']} | {r['finished']} | {r['seconds']:.1f} | "
                    f"{r['replies_per_second']:.2f} | {r['tokens_per_second']:.1f} | {r.get('startup_seconds', 0):.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    dtype = resolve_dtype(args.dtype, resolve_device("cpu"))
    reports = []
    for mode in args.modes:
        if mode == "builtin":
            reports.append(measure(args, mode))
        elif args.endpoint:
            reports.append(dict(measure(args, mode, args.endpoint), startup_seconds=0.0))
        else:
            started = time.perf_counter()
            vllm_dtype = "bfloat16" if str(dtype) == "torch.bfloat16" else "float32"
            with vllm_server(resolve_model_path(args.model), args.out_dir / "vllm.log", dtype=vllm_dtype,
                             start_timeout=args.start_timeout) as url:
                startup = time.perf_counter() - started
                reports.append(dict(measure(args, mode, url), startup_seconds=startup, vllm_dtype=vllm_dtype))
    summary = {"model": args.model, "prompts": args.prompts, "num_prompts": args.num_prompts, "dtype": str(dtype),
               "max_new_tokens": args.max_new_tokens, "concurrency": args.concurrency, "batch_size": args.batch_size,
               "reports": reports}
    if len(reports) == 2:
        records = [read_distilled(Path(report["out"])) for report in reports]
        summary["both_answered"], summary["same_reply"], summary["partings"] = partings(args.model, *records)
    (args.out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table(reports))
    if "same_reply" in summary:
        margins = sorted(p["logit_margin"] for p in summary["partings"])
        print(f"same reply on {summary['same_reply']} of the {summary['both_answered']} prompts both answered; "
              f"logit margins where they part: {', '.join(f'{m:.3f}' for m in margins) or 'none'}")
    print(f"report: {args.out_dir / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
