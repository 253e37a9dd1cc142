"""`train --plan` against a measured run: SmolLM2-135M on this CPU, a few real training steps.

What is compared, exactly:
  planned   the plan's total for one process on the CPU (base fp32 + trainable fp32 + AdamW + autocast
            copies + one micro-batch's activations; the plan counts no process runtime on a CPU)
  measured  peak RSS of the training process (ru_maxrss, reported in summary.json) minus the peak RSS
            of a process that only imports torch, transformers and the recipe (the runtime baseline)
Every conversation is longer than --max-length, so every sequence is cut to full length: the plan's
worst case is then the actual case. No held-out evaluation (its peak is not the plan's subject).

  .venv/bin/python benchmarks/plan_vs_measured.py --recipe medusa1      # about a minute on 2 cores
  .venv/bin/python benchmarks/plan_vs_measured.py --recipe eagle3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from medusaforge.cli import parse_command
from medusaforge.training.plan import GIB
from medusaforge.training.plan_model import plan

RECIPE_FLAGS = {
    "medusa1": ["--num-heads", "4", "--head-vocab", "8192"],
    "eagle3": ["--method", "eagle3", "--draft-vocab", "8192", "--vocab-examples", "16"],
}
WORDS = "the model writes a long reply about memory planning for training drafters on many devices".split()


def write_long_conversations(path: Path, count: int, words: int) -> Path:
    """ShareGPT records whose replies run past any --max-length used here."""
    with open(path, "w") as handle:
        for i in range(count):
            reply = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(words))
            handle.write(json.dumps({"conversations": [{"from": "human", "value": f"Question {i}: tell me more."},
                                                       {"from": "gpt", "value": reply}]}) + "\n")
    return path


def baseline_rss(recipe: str) -> int:
    """Peak RSS (bytes) of a process that only imports what the training process imports."""
    module = "medusaforge.training." + recipe
    code = (f"import resource, torch, transformers, {module}, medusaforge.cli; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", choices=list(RECIPE_FLAGS), default="medusa1")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = write_long_conversations(Path(tmp) / "long.jsonl", count=4 * args.batch_size, words=args.max_length)
        argv = ["train", "--model", "smollm2-135m-instruct", "--data", str(data), "--out", str(Path(tmp) / "run"),
                *RECIPE_FLAGS[args.recipe], "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                "--max-steps", str(args.steps), "--eval-fraction", "0", "--device", "cpu", "--dtype", args.dtype,
                "--progress", "false"]
        _, config, _ = parse_command(argv)
        _, trainable, rows, _ = plan(args.recipe, config, [1])
        row = rows[0]
        baseline = baseline_rss(args.recipe)
        subprocess.run([sys.executable, "-m", "medusaforge.cli", *argv], check=True)
        measured = json.loads((Path(tmp) / "run" / "summary.json").read_text())["peak_rss_bytes"]

    terms = {"base": row.base_weights, **row.trainable, "bf16 copies": row.autocast_copies, **row.activations}
    print(f"{args.recipe}: SmolLM2-135M, {trainable:,} trainable parameters, batch {args.batch_size} x {args.max_length} "
          f"tokens, {args.steps} steps, --dtype {args.dtype}, CPU")
    print("planned terms (GiB): " + ", ".join(f"{name} {value / GIB:.3f}" for name, value in terms.items()))
    delta = measured - baseline
    print(f"planned total        {row.total / GIB:.3f} GiB")
    print(f"measured peak RSS    {measured / GIB:.3f} GiB, runtime baseline {baseline / GIB:.3f} GiB, "
          f"difference {delta / GIB:.3f} GiB")
    print(f"plan / measured      {row.total / delta:.3f} ({(row.total - delta) / delta:+.1%})")


if __name__ == "__main__":
    main()
