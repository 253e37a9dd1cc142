"""Teacher-forced top-1 of trained drafters on one cache of text, side by side.

A decoding benchmark over 80 MT-Bench turns takes 24 minutes on a 2-core CPU; this takes about one.
Distil the base's own replies to the prompts you care about, cache them with the EAGLE-3 features,
and every drafter is scored on the same replies: per-step top-1 for an EAGLE-3 draft (step k given
steps < k teacher-forced, as its training's held-out figure), per-head top-1 for Medusa heads.
None of these replies was trained on, so this is the held-out figure on your own traffic rather
than on the training split's tail.

  python benchmarks/draft_top1.py --cache runs/mt-bench-replies/cache \\
      --drafter "old recipe=runs/eagle3-old" --drafter "new=runs/eagle3-demo" --heads "demo=runs/demo/heads"

Make the cache: write the prompts as chat JSONL, then
  medusaforge distill --prompts prompts.jsonl --out runs/mt-bench-replies/distill.jsonl --max-new-tokens 128
  medusaforge cache --data runs/mt-bench-replies/distill.jsonl --eagle3-features --out runs/mt-bench-replies/cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from medusaforge.drafters.eagle3 import load_draft
from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.models import lm_head_of, load_base_model, resolve_device
from medusaforge.training.common import autocast_for, evaluate_heads
from medusaforge.training.distributed import DistributedContext
from medusaforge.training.eagle3 import evaluate_draft
from medusaforge.training.eagle3_features import Eagle3OfflineBatches
from medusaforge.training.hidden_cache import HiddenCache
from medusaforge.training.sources import OfflineBatches

from convergence import labelled
from decode_speed import cpu_capability, cpu_flags


def score(model: str, cache_folder: Path, drafters, heads_folders, num_steps: int = 3, batch_size: int = 8,
          dtype: str = "auto") -> list[tuple[str, list[float]]]:
    """-> [(label, top-1 per step or head)] for each (name, folder) in `drafters` (EAGLE-3) and `heads_folders`."""
    device = resolve_device("cpu")
    context, autocast = DistributedContext(device=device), autocast_for(device, dtype)
    cache = HiddenCache(cache_folder)
    cache.check_model(model)
    base = load_base_model(model, device=device)
    lm_head_weight = lm_head_of(base).weight
    indices = list(range(len(cache.data)))
    print(f"{cache_folder}: {len(indices)} conversations, {cache.data.num_loss_tokens()} reply tokens")
    rows = []
    for name, folder in drafters:
        if cache.feature_layers is None:
            raise SystemExit(f"{cache_folder}: holds no EAGLE-3 features; make it with `medusaforge cache --eagle3-features`")
        draft = load_draft(find_eagle3_folder(folder) or folder, base.get_input_embeddings()).eval()  # OUT or OUT/draft
        if draft.feature_layers != cache.feature_layers:
            raise SystemExit(f"{folder}: reads layers {list(draft.feature_layers)}, {cache_folder} holds {list(cache.feature_layers)}")
        token_map = draft.to_target(torch.arange(draft.config.draft_vocab_size))
        result = evaluate_draft(draft, Eagle3OfflineBatches(cache, lm_head_weight, token_map), indices, batch_size,
                                num_steps, device, autocast, context)
        rows.append((f"EAGLE-3 {name}", result["top1"]))
    for name, folder in heads_folders:
        heads = load_heads(folder, base).eval()
        result = evaluate_heads(heads, OfflineBatches(cache), indices, batch_size, device, autocast, chunk_size=512, context=context)
        rows.append((f"heads {name}", result["top1"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cache", type=Path, required=True, help="a `medusaforge cache --eagle3-features` folder of the replies to score on")
    parser.add_argument("--drafter", type=lambda v: labelled(v, 2), action="append", default=[], help="NAME=DIR of an EAGLE-3 draft (repeatable)")
    parser.add_argument("--heads", type=lambda v: labelled(v, 2), action="append", default=[], help="NAME=DIR of Medusa heads (repeatable)")
    parser.add_argument("--num-steps", type=int, default=3, help="EAGLE-3 steps to score")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    if not args.drafter and not args.heads:
        parser.error("give at least one --drafter or --heads")

    print(cpu_capability(cpu_flags()))
    rows = score(args.model, args.cache, args.drafter, args.heads, args.num_steps, args.batch_size, args.dtype)
    width = max(len(label) for label, _ in rows)
    print(f"| {'drafter':<{width}} | top-1 per step or head, from 0 |")
    print(f"|{'-' * (width + 2)}|-------------------------------|")
    for label, top1 in rows:
        print(f"| {label:<{width}} | {' / '.join(f'{x:.3f}' for x in top1)} |")


if __name__ == "__main__":
    main()
