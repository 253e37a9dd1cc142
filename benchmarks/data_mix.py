"""The data mix for Medusa heads (issue 19, item 3): self-distilled replies, human replies, and both,
against total CPU minutes, generation included.

Generating a reply with the base costs a decode step per token; reading a human reply costs one
batched forward pass over it, several times cheaper per token. But the heads predict the base's own
text at decode time, and a person's reply is not what the base would have written. This script
measures which wins for a fixed training time:

  distilled  the base's own replies (`make demo`'s distill.jsonl, less the held-out share)
  human      chitchat-dataset conversations, one speaker as the user and the other as the assistant
  mix        both

Each arm caches its hidden states (`medusaforge cache`, timed), then trains heads with the demo's
recipe for the same --train-minutes (`medusaforge train --max-minutes`), every arm held out on the
same text: a share of the distilled replies the base wrote, never trained on (--held-out-cache).
Then each arm's heads decode --mt-bench prompts (default tree, no adaptive drafting, greedy) for
their mean accept length. CPU minutes = generation (the distilled share of --distill-seconds, what
`distill` printed for the whole file) + the arm's cache pass + its training loop.

  .venv/bin/python benchmarks/data_mix.py --distilled runs/demo/distill.jsonl --distill-seconds 248 \\
      --human 600 --train-minutes 3.93 --out runs/data-mix
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

from medusaforge.data.chitchat import human_chats
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.decoder import medusa_generate
from medusaforge.decoding.loading import load_for_decoding, stop_token_ids
from medusaforge.files import atomic_write_text

BIN = Path(sys.executable).parent


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def run(command: list[str]) -> float:
    """Run a medusaforge command, echoing it; -> its wall seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def cache(data: Path, out: Path, args) -> float:
    return run([str(BIN / "medusaforge"), "cache", "--data", str(data), "--out", str(out), "--max-length", str(args.max_length),
                "--batch-size", "8", "--overwrite"])


def mean_accept(heads: Path, args) -> float:
    """Tokens per verify step of the heads alone on the first --mt-bench MT-Bench prompts."""
    tokenizer, base, loaded = load_for_decoding(args.model, heads, "auto", "cpu")
    eos = stop_token_ids(tokenizer, base)
    steps = tokens = 0
    for chat in load_prompts("mt-bench", args.mt_bench):
        result = medusa_generate(base, loaded, encode_prompt(tokenizer, chat), args.max_new_tokens, eos)
        steps, tokens = steps + result.num_steps, tokens + sum(result.accept_lengths)
    return tokens / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distilled", type=Path, default=Path("runs/demo/distill.jsonl"))
    parser.add_argument("--distill-seconds", type=float, required=True, help="what `distill` took for the whole --distilled file")
    parser.add_argument("--human", type=int, default=600, help="chitchat conversations in the human arm")
    parser.add_argument("--train-minutes", type=float, default=3.93, help="each arm's training time (make demo's: 3.93)")
    parser.add_argument("--held-out", type=float, default=0.1, help="share of the distilled replies held out")
    parser.add_argument("--arms", default="distilled,human,mix")
    parser.add_argument("--mt-bench", type=int, default=8, help="MT-Bench prompts for the accept length (0: skip)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=Path("runs/data-mix"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    distilled = [json.loads(line) for line in args.distilled.read_text().splitlines() if line.strip()]
    order = list(range(len(distilled)))
    random.Random(0).shuffle(order)
    num_held_out = max(1, round(len(distilled) * args.held_out))
    held_out, train = [distilled[i] for i in order[:num_held_out]], [distilled[i] for i in order[num_held_out:]]
    human = [{"messages": chat} for chat in human_chats(args.human, seed=0)]
    generation = args.distill_seconds * len(train) / len(distilled)
    sets = {"distilled": (train, generation), "human": (human, 0.0), "mix": (train + human, generation)}
    write_jsonl(args.out / "held-out.jsonl", held_out)
    cache(args.out / "held-out.jsonl", args.out / "cache-held-out", args)

    rows = []
    for arm in args.arms.split(","):
        records, generation_seconds = sets[arm]
        write_jsonl(args.out / f"{arm}.jsonl", records)
        cache_seconds = cache(args.out / f"{arm}.jsonl", args.out / f"cache-{arm}", args)
        run([str(BIN / "medusaforge"), "train", "--config", "configs/demo-train.yaml", "--cache", str(args.out / f"cache-{arm}"),
             "--held-out-cache", str(args.out / "cache-held-out"), "--max-minutes", str(args.train_minutes),
             "--out", str(args.out / arm), "--overwrite", "--progress", "false"])
        summary = json.loads((args.out / arm / "summary.json").read_text())
        accept = mean_accept(args.out / arm / "heads", args) if args.mt_bench else float("nan")
        minutes = (generation_seconds + cache_seconds + summary["train_seconds"]) / 60
        rows.append((arm, len(records), generation_seconds, cache_seconds, summary["train_seconds"], minutes, summary["held_out"]["top1"], accept))
        print(f"{arm}: {minutes:.1f} CPU min, held-out top-1 {summary['held_out']['top1']}, MT-Bench accept {accept:.3f}", flush=True)

    print(f"\nheld out: {len(held_out)} distilled replies; MT-Bench accept: first {args.mt_bench} prompts, "
          f"{args.max_new_tokens} tokens, default tree, heads alone")
    print("| arm | conversations | generation s | cache s | training s | CPU min | held-out top-1, heads 0-3 | MT-Bench accept |")
    print("|---|---|---|---|---|---|---|---|")
    for arm, count, generation_seconds, cache_seconds, train_seconds, minutes, top1, accept in rows:
        print(f"| {arm} | {count} | {generation_seconds:.0f} | {cache_seconds:.0f} | {train_seconds:.0f} | {minutes:.1f} | "
              f"{' / '.join(f'{x:.3f}' for x in top1)} | {accept:.3f} |")


if __name__ == "__main__":
    main()
