"""Where a drafted Medusa step's time goes, against a plain step, at batch 1 on this host.

The parts of one drafted step are timed on their own, interleaved and repeated after a prefix of a
real prompt plus the base's greedy continuation (so the KV cache is as long as mid-reply):

  plain     a plain decode step (verify_step over the root alone), the unit every ratio is over
  propose   the heads' proposal: their transforms, projections and top-k
  verify    the verify step over the whole tree: base forward, lm_head, acceptance, cache compaction
  base 1    the base decoder's forward over one token (no lm_head)
  base N    the same over the tree's N tokens with its attention mask
  lm_head 1 / N   the vocabulary projection and argmax over 1 and N hidden states

A drafted step costs propose + verify; what it costs beyond "base N" is ours to cut.

  python benchmarks/heads_step_cost.py --heads runs/demo/heads --tree runs/demo/heads/tree.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from decode_speed import cpu_capability, cpu_flags, rotated
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.loading import hf_greedy, load_for_decoding, pick_tree, stop_token_ids
from medusaforge.decoding.tree import cached_tree_buffers, verify_attention_mask
from medusaforge.decoding.verify import crop_cache, new_cache, prefill, run_decoder, verify_step
from medusaforge.drafters.medusa_proposer import MedusaProposer
from medusaforge.drafters.proposer import root_only
from medusaforge.models import lm_head_of


def step_parts(base, heads, tree, prefix: torch.Tensor) -> dict:
    """{part name: a function timing nothing itself, leaving the cache as it found it}."""
    cache = new_cache(base)
    verified = prefill(base, cache, prefix[:-1])
    length, tokens = cache.get_seq_length(), prefix.tolist()
    proposer = MedusaProposer(heads, tree)
    draft = proposer.propose(tokens, verified)
    buffers = cached_tree_buffers(draft.parents, draft.tokens.device)
    decoder, lm_head = base.get_decoder(), lm_head_of(base)
    hidden = torch.randn(draft.num_nodes, base.config.hidden_size, dtype=lm_head.weight.dtype, device=prefix.device)

    def base_forward(num_tokens: int):
        mask = verify_attention_mask(buffers, length, lm_head.weight.dtype) if num_tokens > 1 else None
        positions = (length + buffers.depths)[None] if num_tokens > 1 else torch.tensor([[length]], device=prefix.device)
        run_decoder(decoder, draft.tokens[None, :num_tokens], positions, cache, mask)
        crop_cache(cache, length)

    return {
        "plain": lambda: (verify_step(base, cache, root_only(tokens[-1], prefix.device)), crop_cache(cache, length)),
        "propose": lambda: proposer.propose(tokens, verified),
        "verify": lambda: (verify_step(base, cache, draft), crop_cache(cache, length)),
        "base 1": lambda: base_forward(1),
        f"base {draft.num_nodes}": lambda: base_forward(draft.num_nodes),
        "lm_head 1": lambda: lm_head(hidden[:1]).argmax(-1),
        f"lm_head {draft.num_nodes}": lambda: lm_head(hidden).argmax(-1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--heads", default="runs/demo/heads")
    parser.add_argument("--tree", default=None, help="tree JSON; default: the shipped tree for the head count")
    parser.add_argument("--prompts", default="mt-bench")
    parser.add_argument("--prompt-index", type=int, default=0)
    parser.add_argument("--continuation", type=int, default=100, help="greedy tokens after the prompt before timing")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()

    torch.set_grad_enabled(False)  # the prefill's inference tensors meet the heads' parameters
    tokenizer, base, heads = load_for_decoding(args.model, args.heads, args.dtype, "cpu")
    tree = pick_tree(args.tree, heads.num_heads)
    if not tree:
        parser.error(f"--tree {args.tree}: the tree file says no drafting; time a tree with nodes")
    ids = encode_prompt(tokenizer, load_prompts(args.prompts, args.prompt_index + 1)[args.prompt_index])
    prefix = torch.cat([ids, torch.tensor(hf_greedy(base, ids, args.continuation, stop_token_ids(tokenizer, base)))])
    parts = step_parts(base, heads, tree, prefix)
    print(cpu_capability(cpu_flags()))
    print(f"{args.model} {str(base.dtype).removeprefix('torch.')} x{torch.get_num_threads()} threads; "
          f"{len(prefix)} cached tokens; tree of {len(tree)} nodes; {args.rounds} interleaved rounds after a warm-up round")
    seconds = {name: [] for name in parts}
    for round_ in range(args.rounds + 1):
        for name in rotated(list(parts), round_):
            start = time.perf_counter()
            parts[name]()
            if round_ > 0:
                seconds[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(times) * 1000 for name, times in seconds.items()}
    plain = medians["plain"]
    print(f"| {'part':<12} | median ms | vs plain step |")
    print(f"|{'-' * 14}|-----------|---------------|")
    for name, ms in medians.items():
        print(f"| {name:<12} | {ms:9.2f} | {ms / plain:12.2f}x |")
    drafted = medians["propose"] + medians["verify"]
    base_extra = medians[f"base {len(tree) + 1}"] - medians["base 1"]
    print(f"a drafted step (propose + verify): {drafted:.1f} ms, {drafted / plain:.2f}x a plain step; of its "
          f"{drafted - plain:.1f} ms extra, the base forward over {len(tree) + 1} tokens instead of 1 is {base_extra:.1f} ms "
          f"and the rest ({drafted - plain - base_extra:.1f} ms) is the proposal, lm_head over the tree, acceptance and cache compaction")


if __name__ == "__main__":
    main()
