"""How often truncated heads keep their top-1 when widened to the full vocabulary, per fill, on real
hidden states (a `medusaforge cache` folder):

  shadow      what `export --format vllm` writes (ties with the nearest lower in-map token)
  zero        what `export --format medusa` writes
  base-rows   what the removed `--expand-vocab` wrote (the base lm_head's rows)
  shadow-bf16 shadow rows with bf16 logits, as vLLM computes them with dtype bfloat16

  .venv/bin/python benchmarks/widened_vocab_agreement.py --heads runs/demo/heads --cache runs/demo/cache
"""

from __future__ import annotations

import argparse

import torch

from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.interop.full_vocab import SHADOW, ZERO, full_vocab_rows, top1_agreement, trained_top1
from medusaforge.models import read_lm_head_weight, resolve_model_path
from medusaforge.training.hidden_cache import HiddenCache


def cache_hidden_states(directory: str, max_tokens: int) -> torch.Tensor:
    """[N, hidden] float32 hidden states at assistant tokens, from examples spread over the cache."""
    cache = HiddenCache(directory)
    stride = max(1, len(cache) // 256)
    parts = [cache.hidden(i)[cache.data.example(i)[1].bool()].float() for i in range(0, len(cache), stride)]
    return torch.cat(parts)[:max_tokens]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", required=True, help="heads trained with --head-vocab (own projections)")
    parser.add_argument("--cache", required=True, help="hidden-state cache of the same base model")
    parser.add_argument("--model", default="", help="base model for the base-rows fill (default: the heads' base_model)")
    parser.add_argument("--max-tokens", type=int, default=20000)
    args = parser.parse_args()
    heads = load_heads(args.heads)
    if heads.token_map is None or heads.config.shared_lm_head:
        raise SystemExit(f"{args.heads}: these heads have no per-head truncated vocabulary; nothing is widened")
    token_map, vocab = heads.token_map, heads.config.vocab_size
    hidden = cache_hidden_states(args.cache, args.max_tokens)
    base = read_lm_head_weight(resolve_model_path(args.model or heads.config.base_model))
    print(f"{len(hidden)} hidden states; {len(token_map)} of {vocab} tokens in the map; "
          f"{int(token_map.min())} ids lie below the first in-map id")
    with torch.no_grad():
        for k in range(heads.num_heads):
            rows = heads.projection_weight(k)
            x = heads.transform(hidden.to(rows.dtype), k)
            based = base.to(rows.dtype).clone()
            based[token_map] = rows
            shown = {fill: top1_agreement(x, rows, token_map, full_vocab_rows(rows, token_map, vocab, fill))
                     for fill in (SHADOW, ZERO)}
            shown["base-rows"] = top1_agreement(x, rows, token_map, based)
            shadow16 = full_vocab_rows(rows, token_map, vocab, SHADOW).bfloat16()
            trained16 = trained_top1(x.bfloat16(), rows.bfloat16(), token_map, vocab)
            shown["shadow-bf16"] = float(((x.bfloat16() @ shadow16.T).argmax(-1) == trained16).float().mean())
            print(f"head {k}: " + ", ".join(f"{name} {100 * v:.2f}%" for name, v in shown.items()), flush=True)


if __name__ == "__main__":
    main()
