"""The built-in `self` prompt source: user requests written by the base model itself.

An instruct model has learnt what its users ask. Given its chat template up to the start of a user
turn and nothing else, it samples a user request (the Magpie method, Xu et al. 2024). The requests
range as widely as the model's own instruction data did, with no dataset to download: a source of
prompts for a model whose users' prompts you do not have. On SmolLM2, drafters trained on the
replies to them predict other prompts' replies slightly better than drafters trained on the
built-in templates, and MT-Bench's no better (docs/benchmarks.md).
"""

from __future__ import annotations

from time import perf_counter

import torch
from tqdm import tqdm

MARKER = "\x00request\x00"


def request_prefix(tokenizer) -> str:
    """The chat template's text up to where a user's first message goes (the default system
    prompt, if the template adds one, included)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False)
    if MARKER not in rendered:
        raise ValueError("the chat template does not copy the user's message verbatim; self-written requests need one that does")
    return rendered[: rendered.index(MARKER)]


def end_of_turn_ids(base, tokenizer) -> set[int]:
    """Every token that ends the model's turn: its generation config's and the tokenizer's EOS."""
    eos_ids = base.generation_config.eos_token_id
    return set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) | {tokenizer.eos_token_id}


def finished_text(tokens: list[int], stop_ids: set[int], tokenizer) -> str | None:
    """The text before the first end-of-turn token, or None when the turn never ended (a request
    cut off mid-sentence is not one a user would send)."""
    ends = [position for position, token in enumerate(tokens) if token in stop_ids]
    return tokenizer.decode(tokens[: ends[0]], skip_special_tokens=True).strip() if ends else None


@torch.no_grad()
def self_requests(
    base, tokenizer, count: int, *, max_new_tokens: int = 64, batch_size: int = 64, temperature: float = 1.0,
    top_p: float = 0.95, min_chars: int = 8, max_seconds: float = 0.0, seed: int = 0, progress: bool = False,
) -> list[list[dict]]:
    """Up to `count` distinct single-turn chats, each a request the base wrote when asked for nothing.

    Requests that run past max_new_tokens, are shorter than min_chars or repeat an earlier one
    (case aside) are dropped, so more are sampled than kept. Sampling stops at `count` kept, after
    max_seconds (0: no limit), or after as many draws as 4 x count finds too few new ones.
    """
    prefix = tokenizer(request_prefix(tokenizer), return_tensors="pt", add_special_tokens=False)["input_ids"].to(base.device)
    stop_ids = end_of_turn_ids(base, tokenizer)
    kept, seen, drawn, started = [], set(), 0, perf_counter()
    bar = tqdm(total=count, disable=not progress, desc="requests")
    # Seeded sampling that leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[base.device] if base.device.type == "cuda" else []):
        torch.manual_seed(seed)
        while len(kept) < count and drawn < 4 * count:
            if max_seconds and perf_counter() - started > max_seconds:
                break
            rows = min(batch_size, 4 * count - drawn)
            generated = base.generate(
                prefix.expand(rows, -1), attention_mask=torch.ones(rows, prefix.shape[1], dtype=torch.long, device=base.device),
                max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_ids),
            )
            drawn += rows
            for tokens in generated[:, prefix.shape[1] :].tolist():
                text = finished_text(tokens, stop_ids, tokenizer)
                if text and len(text) >= min_chars and text.lower() not in seen and len(kept) < count:
                    seen.add(text.lower())
                    kept.append([{"role": "user", "content": text}])
                    bar.update(1)
    bar.close()
    return kept
