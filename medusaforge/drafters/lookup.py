"""Prompt-lookup drafting: guess the next tokens by finding where the text so far repeated itself.

Answers that copy from their input (summaries, extraction, rewrites, code edits) contain long runs
of tokens already seen in the prompt. If the last n tokens also occur earlier, the tokens that
followed them there are a good guess for what follows now (Saxena's prompt lookup decoding, vLLM's
ngram proposer). The index and the chains are pure Python over token ids; LookupProposer wraps
them in the drafter interface.

The index is incremental: each accepted token adds one entry per n-gram length that ends at it,
so a step costs O(max_ngram) dict operations whatever the context length, and nothing is rescanned.

Example, min_ngram 1, max_ngram 2, stream [5, 6, 7, 5, 6]:
  the suffix [5, 6] also ended at position 1, where [7, 5, 6] followed, so the proposal is [7, 5, 6]
  (a continuation that runs into the suffix itself is continued with its own tokens: period 3).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from medusaforge.drafters.merge import accepted_source, chain_tree
from medusaforge.drafters.proposer import DraftTree

Ngram = tuple[int, ...]


@dataclass
class NgramIndex:
    """Every n-gram (min_ngram <= n <= max_ngram) of a growing token stream -> where it ended.

    A stored position is the index of the token that followed the n-gram (its continuation start).
    Only the `max_positions` most recent occurrences per n-gram are kept: old ones are rarely the
    best guess, and the cap keeps both the memory and the work per lookup bounded.
    """

    min_ngram: int = 1
    max_ngram: int = 4
    max_positions: int = 4
    tokens: list[int] = field(default_factory=list)
    _ends: dict[Ngram, list[int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"lookup n-gram sizes: need 1 <= min_ngram <= max_ngram, got min {self.min_ngram}, max {self.max_ngram}")
        if self.max_positions < 1:
            raise ValueError(f"lookup max_positions must be at least 1, got {self.max_positions}")
        stream, self.tokens = list(self.tokens), []
        self.extend(stream)

    def extend(self, tokens: Iterable[int]) -> None:
        """Append tokens (the prompt once, then each step's accepted tokens) and index them."""
        for token in tokens:
            self.tokens.append(int(token))
            end = len(self.tokens)
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                ends = self._ends.setdefault(tuple(self.tokens[end - n :]), [])
                ends.append(end)
                # +1: the newest entry is the current suffix itself, which has no continuation yet.
                if len(ends) > self.max_positions + 1:
                    del ends[0]

    def longest_match(self) -> tuple[int, list[int]]:
        """-> (n, continuation starts, most recent first) for the longest suffix of the stream that
        also occurred earlier; (0, []) when no suffix of at least min_ngram tokens did."""
        end = len(self.tokens)
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            starts = [s for s in reversed(self._ends.get(tuple(self.tokens[end - n :]), ())) if s < end]
            if starts:
                return n, starts
        return 0, []

    def continuation(self, start: int, length: int) -> list[int]:
        """`length` tokens from `start`. Past the end of the stream the guess reads its own tokens,
        so a match that overlaps the suffix continues the repeating pattern (stream + guess)."""
        guess: list[int] = []
        for i in range(start, start + length):
            guess.append(self.tokens[i] if i < len(self.tokens) else guess[i - len(self.tokens)])
        return guess


def lookup_chains(index: NgramIndex, num_tokens: int, max_branches: int = 1) -> list[list[int]]:
    """Draft chains for the tokens after the stream's last token (the tree's root).

    -> up to `max_branches` distinct chains of `num_tokens` tokens, most recent match first, all
    from the longest matching n-gram; [] when nothing matches. Chains may share a prefix: merging
    them into a tree (drafters/merge.py) makes shared prefixes shared nodes.
    """
    if num_tokens <= 0 or max_branches <= 0:
        return []
    _, starts = index.longest_match()
    chains: list[list[int]] = []
    for start in starts:
        chain = index.continuation(start, num_tokens)
        if chain not in chains:
            chains.append(chain)
        if len(chains) == max_branches:
            break
    return chains


class LookupProposer:
    """Prompt lookup behind the drafter interface (drafters/proposer.py): the longest recent n-gram
    match's continuation as a chain (or a few branches); no draft when nothing matches, so the
    step costs what a plain decode step costs.

    `steps` holds (which source supplied the accepted path, candidates accepted) for every verify
    step of the current sequence: ("lookup", k) or ("none", 0).
    """

    feature_layers: tuple[int, ...] = ()
    names = ("lookup",)

    def __init__(
        self,
        num_tokens: int = 16,
        max_branches: int = 1,
        min_ngram: int = 1,
        max_ngram: int = 4,
        max_positions: int = 4,
        reference: Iterable[int] = (),
        scale_by_match: bool = True,
    ) -> None:
        """reference: tokens of a text the answers may copy besides their prompt (a document, a file
        being edited), indexed before every sequence; the prompt and the output are always indexed.
        scale_by_match: draft num_tokens * n / max_ngram tokens (rounded up) for an n-token match, as a
        short match is less often followed by the same text for long."""
        if num_tokens < 1:
            raise ValueError(f"lookup num_tokens must be at least 1, got {num_tokens}")
        self.num_tokens, self.max_branches = num_tokens, max_branches
        self.sizes = dict(min_ngram=min_ngram, max_ngram=max_ngram, max_positions=max_positions)
        self.reference = [int(t) for t in reference]
        self.scale_by_match = scale_by_match
        self.steps: list[tuple[str, int]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the sequence: the next draft indexes its tokens from the start."""
        self.index = NgramIndex(**self.sizes, tokens=self.reference)
        self._seen = 0  # tokens of the sequence already in the index
        self.steps = []
        self._sources: tuple[int, ...] | None = None  # of the draft being verified; None: no draft of ours

    def update(self, verified) -> None:
        if verified.start == 0:
            self.reset()
        elif verified.nodes is not None:
            self.steps.append(step_source(self._sources, verified.nodes, self.names))
        self._sources = None

    def propose(self, tokens: list[int], verified):
        draft = self.draft(tokens, verified.hidden.device)
        self._sources = draft.sources if draft is not None else None
        return draft

    def draft(self, tokens: list[int], device) -> DraftTree | None:
        """tokens: every token so far, ending with the root -> the lookup draft, or None."""
        # Only the tokens verified since the last call are new: the index never rescans.
        self.index.extend(tokens[self._seen :])
        self._seen = len(tokens)
        num_tokens = self.num_tokens
        if self.scale_by_match:
            match_length, _ = self.index.longest_match()
            num_tokens = -(-num_tokens * match_length // self.index.max_ngram)
        chains = lookup_chains(self.index, num_tokens, self.max_branches)
        if not chains:
            return None
        node_tokens, parents = chain_tree(tokens[-1], chains)
        return DraftTree(torch.tensor(node_tokens, device=device), tuple(parents), (1,) * len(parents))


def step_source(sources: tuple[int, ...] | None, nodes, names) -> tuple[str, int]:
    """(which sources supplied the accepted path, candidates accepted) for one verify step.
    sources None: the decoder verified a draft that was not ours (a plain step)."""
    nodes = [int(n) for n in nodes]
    if sources is None or len(nodes) <= 1:
        return "none", len(nodes) - 1
    return accepted_source(sources, nodes, names), len(nodes) - 1
