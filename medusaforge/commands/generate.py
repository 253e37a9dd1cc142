"""`medusaforge generate`: text from a prompt with Medusa tree decoding, plus the step statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from medusaforge.config import option
from medusaforge.data.prompts import encode_prompt, load_prompts
from medusaforge.decoding.loading import adaptive_drafting, load_drafter, stop_token_ids
from medusaforge.drafters.eagle3_proposer import DynamicTree
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.models import DEFAULT_MODEL


@dataclass
class GenerateConfig:
    """Generate text with Medusa tree speculative decoding (greedy is lossless)."""

    model: str = option(DEFAULT_MODEL, "base model: built-in name, local folder or hub id")
    heads: Path = option(Path("runs/demo/heads"), "heads folder (a train --out folder or its heads/ subfolder)")
    prompt: str = option("", "prompt text (rendered with the chat template)")
    prompts: str = option("", "instead of --prompt: a prompts file (.jsonl / .txt), 'mt-bench' or 'copy-heavy'")
    limit: int = option(0, "with --prompts: use only the first N (0 = all)")
    tree: Path | None = option(None, "tree JSON; default: the heads' or EAGLE-3 folder's tree.json when present (`medusaforge tree ... --out DIR/tree.json` writes it), else the shipped tree for the head count")
    lookup: bool = option(True, "also draft prompt-lookup chains (n-gram matches in the prompt and the text so far), merged "
                                "into the drafter's tree (heads or EAGLE-3)")
    lookup_tokens: int = option(16, "with --lookup: tokens per lookup chain after a full-length n-gram match (fewer after a shorter one)")
    adaptive: bool = option(True, "shrink the draft, or decode without one, while recent acceptance does not pay for its verify cost")
    drafter: Path | None = option(None, "drafter folder instead of --heads: an EAGLE-3 draft (train --method eagle3's OUT "
                                        "or OUT/draft, an export, SpecForge's) or a heads folder")
    eagle_topk: int = option(DynamicTree.topk, "EAGLE-3 tree: children per expanded node, and nodes expanded per depth")
    eagle_depth: int = option(DynamicTree.depth, "EAGLE-3 tree: draft steps at most")
    eagle_nodes: int = option(DynamicTree.num_nodes, "EAGLE-3 tree: candidate nodes verified per step")
    max_new_tokens: int = option(128, "tokens to generate at most")
    temperature: float = option(0.0, "0 = greedy (lossless); > 0 samples: typical acceptance with heads, "
                                     "speculative sampling (lossless) with an EAGLE-3 drafter")
    typical_epsilon: float = option(0.09, "typical acceptance: hard threshold epsilon")
    typical_alpha: float = option(0.3, "typical acceptance: entropy-scaled threshold alpha")
    chat: bool = option(True, "render prompts with the tokenizer's chat template")
    dtype: str = option("auto", "bf16, fp32 or auto (bf16 where the hardware runs it natively, else fp32)", choices=["auto", "bf16", "fp32", "fp16"])
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    seed: int = option(0, "random seed for sampling")
    allow_other_base: bool = option(False, "use heads trained against different base weights")

    def validate(self) -> None:
        if not self.prompt and not self.prompts:
            raise ValueError("give --prompt TEXT or --prompts FILE")
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be at least 1")
        if self.lookup_tokens < 1:
            raise ValueError("--lookup-tokens must be at least 1")
        DynamicTree(self.eagle_topk, self.eagle_depth, self.eagle_nodes)  # raises for values below 1


def run(config: GenerateConfig) -> None:
    torch.manual_seed(config.seed)
    loaded = load_drafter(config.model, config.drafter or config.heads, config.tree,
                          DynamicTree(config.eagle_topk, config.eagle_depth, config.eagle_nodes), config.dtype, config.device,
                          config.allow_other_base)
    tokenizer, base = loaded.tokenizer, loaded.base
    eos = stop_token_ids(tokenizer, base)
    chats = [[{"role": "user", "content": config.prompt}]] if config.prompt else load_prompts(config.prompts, config.limit)
    generator = torch.Generator(device=base.device).manual_seed(config.seed)
    lookup = LookupProposer(num_tokens=config.lookup_tokens) if config.lookup else None
    adaptive = adaptive_drafting(loaded.tree_file, config.adaptive, base.dtype)  # an EAGLE-3 tree file carries its step cost too
    for messages in chats:
        input_ids = encode_prompt(tokenizer, messages, chat=config.chat).to(base.device)
        start = time.perf_counter()
        result = loaded.generate(input_ids, config.max_new_tokens, eos, lookup=lookup, adaptive=adaptive, temperature=config.temperature,
                                 typical_epsilon=config.typical_epsilon, typical_alpha=config.typical_alpha, generator=generator)
        seconds = time.perf_counter() - start
        print(tokenizer.decode(result.tokens, skip_special_tokens=True))
        accept = sum(result.accept_lengths) / max(result.num_steps, 1)
        print(
            f"[{len(result.tokens)} tokens in {result.num_steps} verify steps ({result.drafted.count(0)} without a draft), "
            f"accept length {accept:.2f}, "
            f"{len(result.tokens) / seconds:.1f} tok/s, stopped by {result.stopped_by}]",
            flush=True,
        )
