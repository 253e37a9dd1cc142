"""Draft chains for engines that verify one chain per request (vLLM 0.32 has no token trees).

Our decoder verifies a tree that merges a prompt-lookup chain into the trained drafter's tree
(drafters/hybrid.py). An engine that verifies chains gets one of the two per request and step:
  - the lookup chain when the context repeats itself (the longest suffix that occurred earlier
    is at least `lookup_min_ngram` tokens long: the same rule that puts lookup first in the
    hybrid's tree), `num_tokens` long. (LookupProposer shortens chains after short matches, from
    its 16 tokens; an engine verifies only a few, and vLLM's own ngram chains are not shortened);
  - otherwise the trained drafter's chain: each Medusa head's argmax in order, or the EAGLE-3
    draft's greedy chain (Eagle3Proposer with a top-1 tree of depth num_tokens is exactly that).

`ChainDrafter` keeps the per-request state an engine's batch needs (a lookup index, an EAGLE-3 KV
cache) keyed by the engine's request id, and drops it when the engine says the request finished
(or when it stops being live). It knows nothing of the engine: serving/vllm/ turns vLLM's batch
into `ChainRequest`s, so everything here is tested without vLLM.

A request's step, as the engine reports it (positions of the base's forward pass this step):
    tokens = [p0 ... p_{s-1} | v_s ... v_{s+n-1} | r]
    the base ran positions s .. s+n-1 (prefill chunk, or the root and the accepted drafts),
    hidden[i] / features[i] belong to position s+i, and r is the token it chose after them (the
    new root, not yet run). The chain drafted now is the guess for the tokens after r.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer
from medusaforge.drafters.lookup import NgramIndex, lookup_chains
from medusaforge.drafters.proposer import Verified

LOOKUP = "lookup"
HEADS = "heads"
EAGLE3 = "eagle3"


@dataclass
class ChainRequest:
    """One request's step (see the module docstring). hidden: [n, H] final post-norm hidden states;
    features: [n, L, H] the EAGLE-3 feature layers (None unless the drafter is EAGLE-3)."""

    req_id: str
    tokens: list[int]
    start: int
    hidden: torch.Tensor | None = None
    features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.tokens) - 1 - self.start
        if n < 1:
            raise ValueError(f"request {self.req_id}: {len(self.tokens)} tokens and the step started at {self.start}: "
                             "the base ran no position this step")
        for name in ("hidden", "features"):
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"request {self.req_id}: {name} has {value.shape[0]} rows for {n} positions run")


@dataclass
class _State:
    index: NgramIndex
    eagle: Eagle3Proposer | None = None
    # EAGLE-3 cache positions are relative to the first position it saw: an engine that skips a
    # cached prefix (prefix caching) starts a request's draft cache mid-text, and rotary attention
    # only needs positions consistent with each other.
    offset: int = 0
    chosen: list[str] = field(default_factory=list)  # which source drafted each step (for tests, stats)


def heads_chain(heads: nn.Module, hidden: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """hidden [B, H] -> [B, num_tokens] full-vocabulary ids: head k's argmax for token k+2 after
    each position. Only the truncated projection runs (token_map maps ids back), once per head."""
    if num_tokens > heads.num_heads:
        raise ValueError(f"a chain of {num_tokens} tokens needs {num_tokens} heads; these have {heads.num_heads}")
    ids = []
    for k in range(num_tokens):
        transformed = heads.transform(hidden, k)
        top = F.linear(transformed, heads.projection_weight(k).to(transformed.dtype)).argmax(-1)  # [B]
        ids.append(heads.token_map[top] if heads.token_map is not None else top)
    return torch.stack(ids, dim=1)


def lookup_chain(index: NgramIndex, num_tokens: int, min_ngram: int) -> list[int]:
    """The `num_tokens` lookup chain after the stream's last token (most recent longest match), or
    [] when the longest match is shorter than min_ngram."""
    if index.longest_match()[0] < max(min_ngram, 1):
        return []
    chains = lookup_chains(index, num_tokens)
    return chains[0] if chains else []


class ChainDrafter:
    """Per request per step: a lookup chain when the context matches, else the drafter's chain.

    heads: MedusaHeads (on the hidden states' device and dtype); eagle3: an Eagle3Draft ready to run
    (drafters.eagle3_proposer.prepare_draft); neither: lookup only. max_batch: draft nothing when
    more requests than this share a step (verifying drafts for a large batch costs more than it
    saves); the states still follow every step, so drafting resumes when the batch shrinks.
    """

    def __init__(
        self,
        num_tokens: int,
        heads: nn.Module | None = None,
        eagle3: nn.Module | None = None,
        lookup: bool = True,
        lookup_min_ngram: int = 2,
        max_ngram: int = 4,
        max_batch: int | None = None,
    ) -> None:
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
        if heads is not None and eagle3 is not None:
            raise ValueError("ChainDrafter: give Medusa heads or an EAGLE-3 draft, not both")
        if heads is None and eagle3 is None and not lookup:
            raise ValueError("ChainDrafter: nothing to draft with (no heads, no EAGLE-3 draft, lookup off)")
        if heads is not None and num_tokens > heads.num_heads:
            raise ValueError(f"{num_tokens} speculative tokens, but the heads have only {heads.num_heads} heads")
        self.num_tokens, self.heads, self.eagle3 = num_tokens, heads, eagle3
        self.lookup = lookup
        # Without a model drafter any match is worth a chain (LookupProposer's own rule).
        self.lookup_min_ngram = lookup_min_ngram if (heads is not None or eagle3 is not None) else 1
        self.max_ngram = max_ngram
        self.max_batch = max_batch
        self.states: dict[str, _State] = {}

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return tuple(self.eagle3.feature_layers) if self.eagle3 is not None else ()

    @property
    def needs_hidden(self) -> bool:
        return self.heads is not None

    def forget(self, req_ids: Iterable[str]) -> None:
        """Drop finished requests' states."""
        for req_id in req_ids:
            self.states.pop(req_id, None)

    def retain(self, live: Iterable[str]) -> None:
        """Keep only the states of `live` requests (the engine's running set)."""
        live = set(live)
        self.forget([req_id for req_id in self.states if req_id not in live])

    @torch.inference_mode()
    def step(self, requests: list[ChainRequest]) -> list[list[int]]:
        """One engine step -> one chain per request, in order ([] for no draft)."""
        states = [self._follow(request) for request in requests]
        if self.max_batch is not None and len(requests) > self.max_batch:
            return [[] for _ in requests]
        chains: list[list[int]] = [[] for _ in requests]
        want_model = []
        for i, (request, state) in enumerate(zip(requests, states)):
            chain = lookup_chain(state.index, self.num_tokens, self.lookup_min_ngram) if self.lookup else []
            if chain:
                chains[i] = chain
                state.chosen.append(LOOKUP)
            elif self.heads is not None or self.eagle3 is not None:
                want_model.append(i)
            else:
                state.chosen.append("none")
        if self.heads is not None and want_model:
            # One batched pass of the heads over every request's last run position.
            hidden = torch.stack([requests[i].hidden[-1] for i in want_model])
            for i, chain in zip(want_model, heads_chain(self.heads, hidden, self.num_tokens).tolist()):
                chains[i] = chain
                states[i].chosen.append(HEADS)
        elif self.eagle3 is not None:
            for i in want_model:
                draft = states[i].eagle.propose(requests[i].tokens, None)
                chains[i] = draft.tokens[1:].tolist()
                states[i].chosen.append(EAGLE3)
        return chains

    def _follow(self, request: ChainRequest) -> _State:
        """The request's state, brought up to this step (created or rebuilt when it is new or the
        engine recomputed it from an earlier position, e.g. after preemption)."""
        state = self.states.get(request.req_id)
        if state is not None and len(state.index.tokens) > len(request.tokens):
            state = None  # the text shrank: not the stream we indexed
        if state is None:
            state = _State(NgramIndex(min_ngram=1, max_ngram=self.max_ngram))
            self.states[request.req_id] = state
        state.index.extend(request.tokens[len(state.index.tokens):])
        if self.eagle3 is not None:
            self._follow_eagle(state, request)
        return state

    def _follow_eagle(self, state: _State, request: ChainRequest) -> None:
        if request.features is None:
            raise ValueError(f"request {request.req_id}: the EAGLE-3 drafter needs the base's feature layers")
        eagle = state.eagle
        queued = None if eagle is None else eagle.committed + sum(t.shape[1] for t, _, _ in eagle.pending)
        if eagle is None or queued != request.start - state.offset:
            # New, or a gap/recompute: start the draft cache at this step's first position.
            state.eagle = Eagle3Proposer(self.eagle3, DynamicTree(topk=1, depth=self.num_tokens, num_nodes=self.num_tokens))
            state.offset = request.start
        run = request.tokens[request.start: -1]
        state.eagle.update(Verified(start=request.start - state.offset, tokens=run, next_token=request.tokens[-1],
                                    hidden=request.features[:, 0], features=request.features))
