"""Draft cost at decoding time: how long an EAGLE-3 draft takes to propose one tree, against a plain base step.

A speculative step costs the draft's proposal plus the base's verify of the tree. This script times the
first part alone, so a change to the proposer shows up undiluted: for each tree shape (top-k x depth x
nodes), `propose` is called on a few prompts after their prefill, interleaved with a plain one-token base
step on the same prompt (the order rotates every round; round 0 warms up), and the medians are compared:

  draft cost = X ms = Y x a plain step

The shapes timed are the proposer's default, the drafter folder's tree.json when `medusaforge tree
--drafter DIR --out DIR/tree.json` wrote one, and every --shape given. The draft's compute does not
depend on its trained weights, so --random-draft times a randomly initialised draft of the base's shape
(draft vocabulary --draft-vocab) where no trained one exists.
Usage:

  python benchmarks/draft_cost.py --drafter runs/eagle3-demo
  python benchmarks/draft_cost.py --random-draft --shape 8x3x24 --shape 4x5x16
  OMP_NUM_THREADS=1 python benchmarks/draft_cost.py --random-draft   # a busy 2-core host: a starved second
                                                                     # thread stretches every step ~7x

On a CPU the draft is memory-bound: each depth streams the draft layer and its lm_head (draft_vocab rows),
so the cost is about depth x (layer + lm_head bytes) / (the base's bytes per step); only the shape changes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from decode_speed import cpu_capability, cpu_flags, rotated
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.loading import fitted_tree_file, load_eagle3_proposer, load_eagle_tree
from medusaforge.decoding.verify import crop_cache, new_cache, prefill, verify_step
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.drafters.proposer import root_only
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.models import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_device, resolve_dtype

PLAIN = "plain step"


def parse_shape(text: str) -> DynamicTree:
    """'TOPKxDEPTHxNODES', e.g. '8x3x24' -> DynamicTree(8, 3, 24)."""
    try:
        topk, depth, nodes = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected TOPKxDEPTHxNODES, e.g. 8x3x24") from None
    return DynamicTree(topk, depth, nodes)


def shape_name(tree: DynamicTree) -> str:
    return f"top-{tree.topk} x depth {tree.depth} x {tree.num_nodes} nodes"


def shapes_to_time(tree_file: Path | None, given: list[DynamicTree]) -> list[DynamicTree]:
    """The default shape, the fitted one in `tree_file` (unless it says no drafting), the given ones; no repeats."""
    shapes = [DynamicTree()]
    if tree_file is not None and (fitted := load_eagle_tree(tree_file)) is not None:
        shapes.append(fitted)
    return list(dict.fromkeys(shapes + given))


def save_random_draft(base, directory: Path, draft_vocab: int, seed: int) -> Path:
    """A randomly initialised draft of the base's shape, saved as `train --method eagle3` saves one."""
    torch.manual_seed(seed)
    draft = Eagle3Draft(draft_config_from_base(base.config, draft_vocab), base.get_input_embeddings())
    return draft.save(directory)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # note: a host sync, so the clock reads the device's finish


def time_prompt(base, draft, ids: torch.Tensor, shapes: list[DynamicTree], rounds: int) -> dict[str, list[float]]:
    """Seconds per call after `ids`' prefill: {PLAIN: a one-token base step, shape name: one proposal}."""
    cache = new_cache(base)
    layers = tuple(draft.feature_layers)
    verified = prefill(base, cache, ids, layers)
    length, tokens = cache.get_seq_length(), ids.tolist()
    proposers = {shape_name(tree): Eagle3Proposer(draft, tree) for tree in shapes}
    calls = {PLAIN: lambda: (verify_step(base, cache, root_only(verified.next_token, ids.device)), crop_cache(cache, length))}
    for name, proposer in proposers.items():
        proposer.update(verified)
        proposer.catch_up()  # the prompt's draft cache: once per sequence, not part of a step's cost
        calls[name] = lambda proposer=proposer: proposer.propose(tokens + [verified.next_token], verified)
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for round_ in range(rounds + 1):
        for name in rotated(list(calls), round_):
            start = time.perf_counter()
            calls[name]()
            synchronize(ids.device)
            if round_ > 0:
                timings[name].append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--drafter", type=Path, help="an EAGLE-3 draft folder (train --method eagle3's OUT or OUT/draft, an export)")
    parser.add_argument("--random-draft", action="store_true", help="time a random-weight draft of the base's shape instead")
    parser.add_argument("--draft-vocab", type=int, default=8192, help="with --random-draft: draft vocabulary size (make eagle3's)")
    parser.add_argument("--shape", type=parse_shape, action="append", default=[], help="extra tree shape TOPKxDEPTHxNODES (repeatable)")
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--limit", type=int, default=3, help="prompts to time on")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per prompt (plus one warm-up round)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    folder = find_eagle3_folder(args.drafter)
    if folder is None and not args.random_draft:
        parser.error(f"--drafter {args.drafter}: no EAGLE-3 draft there; give a draft folder or --random-draft")

    device = resolve_device(args.device)
    tokenizer = load_tokenizer(args.model)
    base = load_base_model(args.model, dtype=resolve_dtype(args.dtype, device), device=device)
    with tempfile.TemporaryDirectory() as scratch:
        source = folder if folder is not None else save_random_draft(base, Path(scratch) / "draft", args.draft_vocab, seed=0)
        draft = load_eagle3_proposer(source, base).draft
    shapes = shapes_to_time(fitted_tree_file(args.drafter) if folder is not None else None, args.shape)
    encoded = [encode_prompt(tokenizer, chat).to(device) for chat in load_prompts(args.prompts, args.limit)]
    print(cpu_capability(cpu_flags() if device.type == "cpu" else None))
    print(f"{args.model} {str(next(base.parameters()).dtype).removeprefix('torch.')} on {device} x{torch.get_num_threads()} threads; "
          f"draft {'random weights' if folder is None else folder}, vocab {draft.config.draft_vocab_size}; "
          f"{len(encoded)} prompts x {args.rounds} interleaved rounds", flush=True)

    timings: dict[str, list[float]] = {}
    for ids in encoded:
        for name, seconds in time_prompt(base, draft, ids, shapes, args.rounds).items():
            timings.setdefault(name, []).extend(seconds)
    plain = statistics.median(timings[PLAIN])
    print(f"plain step: median {plain * 1000:.1f} ms")
    for tree in shapes:
        cost = statistics.median(timings[shape_name(tree)])
        print(f"{shape_name(tree)}: draft cost = {cost * 1000:.1f} ms = {cost / plain:.2f} x a plain step")


if __name__ == "__main__":
    main()
