"""Is a drafted output greedy decoding's output? Identical, parted at a near-tie, or parted by a bug.

Lossless greedy drafting emits exactly the tokens the base's own greedy decoding emits, and in
fp32 it does, token for token. In bf16 (or fp16) a tree pass rounds differently from a one-token
pass (neither attention nor the linear layers are row-invariant: docs/benchmarks.md), so where the
base's top two logits nearly tie, the two passes may pick different tokens and the outputs part
there without anything being wrong. A bug (a wrong candidate accepted, a stale cache entry kept)
emits a token the base does not nearly prefer. So a parting is judged at the first differing token
by the *gap*: how far the drafted token's logit lies below the top logit in a reference pass of the
base, against a bound for the dtype. Where the drafted token is the runner-up, the gap is the
top-two margin.
"""

from __future__ import annotations

import torch

IDENTICAL, NEAR_TIE, BUG = "identical", "near_tie", "bug"
CLASSES = (IDENTICAL, NEAR_TIE, BUG)

# The bound is a share of the top logit's magnitude, because rounding steps scale with it. bf16
# keeps 8 significant bits: a logit of 16-32 (SmolLM2's range) is stored in steps of 0.125, one of
# 32-64 in steps of 0.25, i.e. 2^-8 to 2^-7 of its size. SmolLM2 in bf16 parted from greedy at
# top-two margins of median 0.125 (one step) and at most 0.5 over ~180 partings on MT-Bench
# (docs/benchmarks.md): rounding differences add up over 30 layers, to a few steps. (A spot check on
# 300 tokens of the demo's replies: one-token and 4-token bf16 passes picked different tokens 8
# times, each within 0.25, 1/130 of the top logit, of the top in a full pass.) The bf16 bound,
# 2^-5 of the top logit (0.5-1.0 at logits of 16-32, 4-8 steps), covers every recorded near-tie,
# while a wrong token mostly lies whole logits below the top (and a bug shows on many outputs).
# fp16 keeps 3 more bits than bf16, so its bound is 8x tighter. fp32 keeps 16 more bits, and every
# recorded fp32 output was identical (80 of 80 MT-Bench): 2^-17 (1.5e-4 at a logit of 20) forgives
# only a tie that fp32 itself cannot settle.
NEAR_TIE_SHARE = {torch.bfloat16: 2.0**-5, torch.float16: 2.0**-8, torch.float32: 2.0**-17}
# Logits near 0 would shrink the bound to nothing; below magnitude 1 the bound stays at its share of 1.
MIN_SCALE = 1.0


def near_tie_bound(top_logit: float, dtype: torch.dtype) -> float:
    """The largest gap below the top logit that rounding in `dtype` explains."""
    return NEAR_TIE_SHARE[dtype] * max(abs(top_logit), MIN_SCALE)


def judge_parting(logits: torch.Tensor, drafted_token: int | None, dtype: torch.dtype) -> dict:
    """logits [vocab]: the base's logits at the first position where the outputs part, from a
    reference pass over greedy's tokens before it; drafted_token: what the drafted output has there.
    -> {"class": NEAR_TIE or BUG, "gap": top logit - the drafted token's, "bound": the dtype's bound}.

    No drafted token there (the drafted output is a strict prefix of greedy's, or greedy's of it)
    means one decoder stopped where the other went on without the two disagreeing on a token: a bug.
    """
    logits = logits.float()
    top = float(logits.max())
    bound = near_tie_bound(top, dtype)
    if drafted_token is None:
        return {"class": BUG, "gap": None, "bound": bound}
    gap = top - float(logits[drafted_token])
    return {"class": NEAR_TIE if gap <= bound else BUG, "gap": gap, "bound": bound}


def count_outputs(judgements: list[dict | None]) -> dict:
    """One entry per output: None where it is identical, else `judge_parting`'s answer.
    -> counts per class and the largest near-tie gap (None without near-ties)."""
    counts = {name: 0 for name in CLASSES}
    near_tie_gaps = []
    for judgement in judgements:
        counts[IDENTICAL if judgement is None else judgement["class"]] += 1
        if judgement is not None and judgement["class"] == NEAR_TIE:
            near_tie_gaps.append(judgement["gap"])
    return {**counts, "largest_near_tie_gap": max(near_tie_gaps, default=None)}


def verdict(judgement: dict | None, index: int | None = None) -> str:
    """A per-output word: 'identical', 'near-tie', or 'MISMATCH' (kept for bugs alone)."""
    if judgement is None:
        return "identical"
    where = f" at token {index}" if index is not None else ""
    if judgement["class"] == NEAR_TIE:
        return f"near-tie{where} (gap {judgement['gap']:.3g})"
    gap = "no token" if judgement["gap"] is None else f"gap {judgement['gap']:.3g}"
    return f"MISMATCH{where} ({gap} > bound {judgement['bound']:.3g}): a bug"


def outputs_line(counts: dict, dtype: torch.dtype) -> str:
    """The summary a reader sees first: identical, near-ties (with the largest gap), bugs."""
    total = sum(counts[name] for name in CLASSES)
    share = f"1/{round(1 / NEAR_TIE_SHARE[dtype])} of the top logit"
    line = f"outputs against greedy: {counts[IDENTICAL]}/{total} identical, {counts[NEAR_TIE]} part at a near-tie"
    if counts[NEAR_TIE]:
        line += f" (largest gap {counts['largest_near_tie_gap']:.3g}; {dtype_name(dtype)} bound: {share})"
    line += f", {counts[BUG]} part otherwise"
    if counts[BUG]:
        line += " (MISMATCH: the drafted token lies beyond any rounding difference, a decoding bug)"
    if counts[NEAR_TIE]:
        line += ("\na near-tie: the base's top logits are so close that a tree pass and a one-token pass, which "
                 "round differently, pick different tokens")
        line += "; in fp32 (--dtype fp32) outputs are identical" if dtype != torch.float32 else ""
    return line


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
