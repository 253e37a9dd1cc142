"""Distillation throughput: HF `generate()` against `generate_batch` (in-place KV cache, finished rows
leave the batch), on the same prompts, side by side.

The prompts are the demo's (built-in chitchat + instructions, rendered chats of at most
--max-prompt-tokens), greedy, --max-new-tokens per reply. They are taken in rounds of --round
prompts, sorted by length as `distill` sorts them; every arm generates every round before the next
round starts, and the arms' order rotates every round, so a change in the host's speed falls on
all of them alike. Each arm is `method:batch` (method `generate` or `ours`). Prints reply tokens
per second per arm, its ratio to the first arm, and how many replies are token-identical to the
first arm's. Usage:

  python benchmarks/distill_speed.py --arms generate:32,ours:32,ours:64 --prompts 256
"""

from __future__ import annotations

import argparse
import time

import torch

from decode_speed import cpu_capability, cpu_flags, rotated
from medusaforge.commands.distill import builtin_prompts, drop_long_prompts, generation_batches
from medusaforge.data.batch_generation import generate_batch
from medusaforge.data.self_requests import end_of_turn_ids
from medusaforge.models import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_device, resolve_dtype


def parse_arm(text: str) -> tuple[str, int]:
    method, _, batch = text.partition(":")
    if method not in ("generate", "ours") or not batch.isdigit() or int(batch) < 1:
        raise argparse.ArgumentTypeError(f"arm {text!r}: expected generate:BATCH or ours:BATCH, e.g. ours:64")
    return method, int(batch)


def hf_generate(base, input_ids, attention_mask, max_new_tokens, stop_ids, pad_id) -> list[list[int]]:
    generated = base.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=False, top_p=None, top_k=None, pad_token_id=pad_id, eos_token_id=sorted(stop_ids))
    replies = []
    for row in generated[:, input_ids.shape[1]:].tolist():
        stops = [i for i, token in enumerate(row) if token in stop_ids]
        replies.append(row[: stops[0] + 1] if stops else row)
    return replies


def run_arm(arm, base, tokenizer, rendered, stop_ids, max_new_tokens) -> list[list[int]]:
    method, batch_size = arm
    replies = [None] * len(rendered)
    for batch in generation_batches([len(text) for text in rendered], batch_size, batches_per_round=len(rendered)):
        encoded = tokenizer([rendered[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(base.device)
        if method == "generate":
            out = hf_generate(base, encoded["input_ids"], encoded["attention_mask"], max_new_tokens, stop_ids, tokenizer.pad_token_id)
        else:
            out = generate_batch(base, encoded["input_ids"], encoded["attention_mask"], max_new_tokens, stop_ids)
        for index, reply in zip(batch, out):
            replies[index] = reply
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--arms", default="generate:32,ours:32,ours:64", help="comma-separated method:batch, the first is the reference")
    parser.add_argument("--prompts", type=int, default=256, help="how many of the demo's prompts")
    parser.add_argument("--round", type=int, default=64, help="prompts per round (a multiple of every arm's batch)")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--max-prompt-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    arms = [parse_arm(text) for text in args.arms.split(",")]
    names = [f"{method} batch {batch}" for method, batch in arms]

    device = resolve_device("auto")
    dtype = resolve_dtype(args.dtype, device)
    print(cpu_capability(cpu_flags()))
    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    base = load_base_model(args.model, dtype=dtype, device=device, check=False)
    prompts = drop_long_prompts(builtin_prompts("chitchat+instructions", 8, 0), tokenizer, args.max_prompt_tokens)[: args.prompts]
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    stop_ids = end_of_turn_ids(base, tokenizer)
    print(f"{args.model} {dtype} x{torch.get_num_threads()} threads; {len(prompts)} prompts in rounds of {args.round}, "
          f"greedy, up to {args.max_new_tokens} new tokens")

    seconds = dict.fromkeys(names, 0.0)
    replies = {name: [] for name in names}
    for round_number, first in enumerate(range(0, len(rendered), args.round)):
        chunk = rendered[first : first + args.round]
        for name in rotated(names, round_number):
            started = time.perf_counter()
            replies[name] += run_arm(arms[names.index(name)], base, tokenizer, chunk, stop_ids, args.max_new_tokens)
            seconds[name] += time.perf_counter() - started
        print(f"round {round_number + 1}: " + "  ".join(f"{name} {sum(map(len, replies[name])) / seconds[name]:.0f} tok/s" for name in names), flush=True)

    reference = names[0]
    reference_speed = sum(map(len, replies[reference])) / seconds[reference]
    print(f"| arm | reply tokens | seconds | tok/s | vs {reference} | replies identical to {reference}'s |")
    print("|---|---|---|---|---|---|")
    for name in names:
        tokens = sum(map(len, replies[name]))
        identical = sum(a == b for a, b in zip(replies[name], replies[reference]))
        print(f"| {name} | {tokens} | {seconds[name]:.1f} | {tokens / seconds[name]:.0f} | "
              f"{tokens / seconds[name] / reference_speed:.2f}x | {identical}/{len(prompts)} |")


if __name__ == "__main__":
    main()
