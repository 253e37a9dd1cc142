"""Batch-1 speculative decoding with any drafter: propose a tree, verify it, keep the accepted path.

After a normal prefill that yields the first token (the first root), every step is:
  1. the proposer drafts a tree whose root is the last verified token (drafters/proposer.py);
  2. `verify_step` runs the base once over the tree, accepts the longest path the base agrees with
     and compacts the KV cache; the base's own token after that path is the next root, so every
     step emits accepted + 1 tokens;
  3. the proposer is told what was verified.
With `adaptive` drafting the decoder may shrink a draft, or skip it for a plain one-token step,
when the recent acceptance does not pay for the verify cost (decoding/adaptive.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from medusaforge.decoding.adaptive import AdaptiveDrafting
from medusaforge.decoding.tree import default_tree
from medusaforge.decoding.verify import new_cache, prefill, verify_step
from medusaforge.drafters.hybrid import HybridProposer
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.drafters.medusa_proposer import Candidates, MedusaProposer
from medusaforge.drafters.proposer import Proposer, root_only
from medusaforge.models import lm_head_of


@dataclass
class DecodeResult:
    tokens: list[int]  # new tokens only; ends with the EOS token if one stopped decoding
    accepted: list[int] = field(default_factory=list)  # candidates accepted at each verify step
    drafted: list[int] = field(default_factory=list)  # candidate nodes verified at each step (0: plain step)
    # with lookup: which drafter supplied each step's accepted path ("heads", "lookup", "both", "none")
    sources: list[str] = field(default_factory=list)
    stopped_by: str = "length"  # "eos" or "length"

    @property
    def num_steps(self) -> int:
        return len(self.accepted)

    @property
    def accept_lengths(self) -> list[int]:
        """Tokens emitted per verify step, counting the base model's own token."""
        return [a + 1 for a in self.accepted]


def single_sequence(input_ids: torch.Tensor) -> torch.Tensor:
    """[T] or [1, T] -> [T]. A [B, T] batch with B > 1 is refused rather than joined into one sequence."""
    if input_ids.dim() == 2 and input_ids.shape[0] != 1 or input_ids.dim() > 2:
        raise ValueError(
            f"the tree decoder decodes one sequence at a time: input_ids has shape {list(input_ids.shape)}; "
            "pass [T] or [1, T] and loop over the batch"
        )
    return input_ids.reshape(-1)


@torch.inference_mode()
def speculative_generate(
    base: nn.Module,
    proposer: Proposer | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    temperature: float = 0.0,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    adaptive: AdaptiveDrafting | None = None,
    speculative: bool = False,
) -> DecodeResult:
    """Generate up to `max_new_tokens` after `input_ids` ([T] or [1, T]); proposer None: plain decoding.

    temperature 0 is greedy and lossless: the tokens equal `base.generate(do_sample=False)`'s, with
    adaptive drafting or without. temperature > 0 uses typical acceptance, or with `speculative`
    speculative sampling (lossless in distribution).
    """
    eos = set(int(t) for t in eos_token_ids)
    device = lm_head_of(base).weight.device
    prompt = single_sequence(input_ids).to(device)
    if max_new_tokens <= 0:
        return DecodeResult(tokens=[])
    layers = tuple(proposer.feature_layers) if proposer is not None else ()
    sampling = dict(temperature=temperature, typical_epsilon=typical_epsilon, typical_alpha=typical_alpha, generator=generator,
                    speculative=speculative)
    cache = new_cache(base)
    verified = prefill(base, cache, prompt, layers, temperature, generator)
    if adaptive is not None:
        adaptive.reset()
    if proposer is not None:
        proposer.update(verified)
    tokens = verified.tokens + [verified.next_token]  # prompt + everything emitted so far
    result = DecodeResult(tokens=[verified.next_token])
    if verified.next_token in eos:
        result.stopped_by = "eos"
        return result

    while len(result.tokens) < max_new_tokens:
        size = adaptive.next_size() if adaptive is not None else None  # candidate nodes allowed
        start = time.perf_counter()  # a step's cost includes drafting it
        draft = None
        if adaptive is not None and hasattr(proposer, "propose_free"):
            # A draft that costs no model run (a long lookup match) goes whole, whatever size adaptive
            # drafting allows the model's draft: cutting a copied run short only loses tokens.
            draft = proposer.propose_free(tokens, verified)
        free = draft is not None
        if draft is None and proposer is not None and size != 0:
            draft = proposer.propose(tokens, verified)
            if draft is not None and size:
                draft = draft.truncated(size + 1)
        if draft is None:
            draft = root_only(tokens[-1], device)
        verified = verify_step(base, cache, draft, layers, **sampling)
        # A free draft's step says nothing about the model's draft that adaptive drafting sizes: not recorded.
        if adaptive is not None and not free:  # verify_step ends in a host sync, so the time is the step's own
            adaptive.record(draft.num_nodes - 1, verified.nodes.tolist(), time.perf_counter() - start)
        if proposer is not None:
            proposer.update(verified)
        result.accepted.append(verified.accepted)
        result.drafted.append(draft.num_nodes - 1)

        for token in verified.tokens[1:] + [verified.next_token]:
            tokens.append(token)
            result.tokens.append(token)
            if token in eos:
                result.stopped_by = "eos"
                return result
            if len(result.tokens) >= max_new_tokens:
                return result
    return result


def medusa_generate(
    base: nn.Module,
    heads: nn.Module | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    tree: list[list[int]] | None = None,
    temperature: float = 0.0,
    typical_epsilon: float = 0.09,
    typical_alpha: float = 0.3,
    generator: torch.Generator | None = None,
    candidates: Candidates | None = None,
    adaptive: AdaptiveDrafting | None = None,
    lookup: LookupProposer | None = None,
) -> DecodeResult:
    """Medusa heads on a path tree (default: the shipped tree for the head count).

    An empty tree (a tree file from `medusaforge tree` that found no draft worth its cost) decodes
    without drafting. `candidates` replaces the heads as the source of candidates (tests use an oracle).
    `lookup`: also draft prompt-lookup chains, merged into the heads' tree (drafters/hybrid.py);
    result.sources then says which drafter supplied each step's accepted path.
    """
    if tree is None:
        if heads is None:
            raise ValueError("medusa_generate: pass a tree when decoding without heads")
        tree = default_tree(heads.num_heads)
    proposer = MedusaProposer(heads, tree, candidates) if tree else None
    if lookup is not None:
        proposer = HybridProposer(proposer, lookup) if proposer is not None else lookup
    result = speculative_generate(
        base, proposer, input_ids, max_new_tokens, eos_token_ids, temperature, typical_epsilon, typical_alpha, generator, adaptive
    )
    return with_sources(result, proposer, lookup)


def eagle3_generate(
    base: nn.Module,
    proposer: Proposer | None,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: Iterable[int] = (),
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    adaptive: AdaptiveDrafting | None = None,
    lookup: LookupProposer | None = None,
) -> DecodeResult:
    """An EAGLE-3 proposer (drafters/eagle3_proposer.py); temperature > 0 uses speculative sampling.

    `lookup`: also draft prompt-lookup chains, merged into the draft's tree as for the heads. After a
    lookup match of 2+ tokens the draft is not run at all that step: its proposal costs 0.16-0.31x a
    plain step on a CPU (docs/benchmarks.md), and the match's chain is usually the accepted path.
    """
    if lookup is not None:  # a tree file that found no draft worth its cost leaves lookup alone
        proposer = HybridProposer(proposer, lookup, model_name="eagle3", model_nodes_on_match=0) if proposer is not None else lookup
    result = speculative_generate(base, proposer, input_ids, max_new_tokens, eos_token_ids, temperature, generator=generator,
                                  adaptive=adaptive, speculative=True)
    return with_sources(result, proposer, lookup)


def with_sources(result: DecodeResult, proposer, lookup: LookupProposer | None) -> DecodeResult:
    """With lookup merged in, result.sources says which drafter supplied each step's accepted path."""
    if lookup is not None:
        result.sources = [source for source, _ in proposer.steps]
    return result
