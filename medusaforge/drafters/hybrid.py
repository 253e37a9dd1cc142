"""Prompt lookup and a model drafter (Medusa heads, EAGLE-3) verified together in one merged tree.

Lookup wins where the reply copies its input and proposes nothing useful on open chat; the heads
are the other way round. A tree verify pass costs little more than a one-token step at these sizes
on a CPU, so instead of picking one source per step, both drafts are merged into one tree
(drafters/merge.py: a prefix both propose is one node) and the base verifies them at once.

Node order matters because adaptive drafting may keep only a draft's first k nodes: the source
listed first keeps its node indices (with adaptive drafting the decoder takes a long match from
`propose_free` instead, whole). The lookup chain goes first when it matched at least
`lookup_first_ngram` tokens (a long match is usually right), the model drafter's tree otherwise.
"""

from __future__ import annotations

import torch

from medusaforge.drafters.lookup import LookupProposer, step_source
from medusaforge.drafters.merge import merge_trees
from medusaforge.drafters.proposer import DraftTree, Proposer, Verified


class HybridProposer:
    """`model` (any proposer with a tree, e.g. MedusaProposer) merged with `lookup` every step.

    `steps` holds, per verify step of the current sequence, which source supplied the accepted
    path ("heads", "lookup", "both" or "none") and how many candidates were accepted.
    """

    def __init__(
        self,
        model: Proposer,
        lookup: LookupProposer,
        lookup_first_ngram: int = 2,
        model_name: str = "heads",
        model_nodes_on_match: int | None = 2,
    ) -> None:
        """model_nodes_on_match: after a lookup match of at least lookup_first_ngram tokens, keep only
        the first k candidate nodes of the model's tree (None: all; 0: do not run the model that step).
        A long match is usually right, and verify slots spent on the heads then cost more than they
        bring: on the probe of benchmarks/lookup_split.py (8 prompts per set, bf16) 2 beat the whole
        tree and none. It shapes `propose`, which the decoder calls on a long match only without
        adaptive drafting (with it, `propose_free`'s chain alone goes)."""
        self.model, self.lookup = model, lookup
        self.lookup_first_ngram = lookup_first_ngram
        self.model_nodes_on_match = model_nodes_on_match
        self.model_name = model_name
        self.feature_layers = tuple(model.feature_layers)
        self.steps: list[tuple[str, int]] = []
        self._sources: tuple[int, ...] | None = None
        self._names: tuple[str, ...] = ()
        # This step's lookup draft: with adaptive drafting the decoder asks propose_free, then propose
        # when there is no long match, and both read the same lookup. Cleared by update.
        self._step_lookup: tuple[DraftTree | None, bool] | None = None

    def update(self, verified: Verified) -> None:
        self.model.update(verified)
        if verified.start == 0:
            self.lookup.reset()
            self.steps = []
        elif verified.nodes is not None:
            self.steps.append(step_source(self._sources, verified.nodes, self._names))
        self._sources, self._step_lookup = None, None

    def propose(self, tokens: list[int], verified: Verified) -> DraftTree | None:
        lookup_draft, long_match = self._lookup_draft(tokens, verified)
        # 0 nodes on a match: the model is not even run (an EAGLE-3 proposal costs 0.16-0.31x a plain step on a CPU).
        skip_model = long_match and self.model_nodes_on_match == 0
        model_draft = None if skip_model else self.model.propose(tokens, verified)
        if long_match and model_draft is not None and self.model_nodes_on_match is not None:
            model_draft = model_draft.truncated(1 + self.model_nodes_on_match)
        drafts = {name: d for name, d in ((self.model_name, model_draft), ("lookup", lookup_draft)) if d is not None}
        if not drafts:
            return None
        names = list(drafts)
        if len(names) == 2 and long_match:
            names.reverse()
        # note: tokens.tolist() is a host sync for drafts on an accelerator; the verify pass syncs anyway.
        merged = merge_trees([(drafts[name].tokens.tolist(), drafts[name].parents) for name in names])
        self._names = tuple(names)
        self._sources = tuple(merged.sources)
        device = next(iter(drafts.values())).tokens.device
        return DraftTree(torch.tensor(merged.tokens, device=device), tuple(merged.parents), self._sources)

    def _lookup_draft(self, tokens: list[int], verified: Verified) -> tuple[DraftTree | None, bool]:
        """-> (lookup's draft or None, whether it came from a match of at least `lookup_first_ngram` tokens),
        worked out once per step."""
        if self._step_lookup is None:
            draft = self.lookup.draft(tokens, verified.hidden.device)
            self._step_lookup = draft, draft is not None and self.lookup.index.longest_match()[0] >= self.lookup_first_ngram
        return self._step_lookup

    def propose_free(self, tokens: list[int], verified: Verified) -> DraftTree | None:
        """The lookup chain alone, and only on a match of at least `lookup_first_ngram` tokens. With
        adaptive drafting the decoder verifies it whole whatever size the model's draft is allowed: it
        costs no model run, and a long match is usually right (its accepted runs average 5-9 tokens),
        so neither turning the model's draft off nor cutting it to a few nodes may cut the chain."""
        lookup_draft, long_match = self._lookup_draft(tokens, verified)
        if not long_match:
            return None
        self._names, self._sources = ("lookup",), lookup_draft.sources  # bit 0 on every node: names[0]
        return lookup_draft


def accept_by_source(sources: list[str], accepted: list[int]) -> dict[str, dict[str, float]]:
    """Per label ("heads", "lookup", "both", "none"): the verify steps whose accepted path that
    source supplied, their share of all steps, and their mean accept length (tokens per step, the
    base's own token included). sources, accepted: one entry per step, as in DecodeResult."""
    if len(sources) != len(accepted):
        raise ValueError(f"accept_by_source: {len(sources)} sources for {len(accepted)} steps")
    report = {}
    for label in sorted(set(sources)):
        lengths = [a + 1 for s, a in zip(sources, accepted) if s == label]
        report[label] = {"steps": len(lengths), "share": len(lengths) / len(sources), "accept_length": sum(lengths) / len(lengths)}
    return report
