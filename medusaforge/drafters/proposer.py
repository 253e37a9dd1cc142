"""The one interface every drafter implements (Medusa heads, prompt lookup, EAGLE-3).

A decode step is: the drafter proposes a draft tree, the base model verifies it in one forward pass
(`medusaforge.decoding.verify.verify_step`), the longest accepted path is kept, and the drafter is
told what was verified. The decoder (`medusaforge.decoding.decoder.speculative_generate`) is written
once for every drafter; a drafter only implements:

    class MyProposer:
        feature_layers: tuple[int, ...] = ()   # base hidden states `update` receives, see Verified
        def update(self, verified: Verified) -> None: ...
        def propose(self, tokens: list[int], verified: Verified) -> DraftTree | None: ...
        # optional: a draft that costs (almost) nothing, such as a long lookup match beside a model;
        # with adaptive drafting the decoder asks for it first every step, verifies it whole (never cut
        # to the model's allowed size) and calls propose only when it returns None
        def propose_free(self, tokens: list[int], verified: Verified) -> DraftTree | None: ...

Call order for one sequence:
    update(prefill)            verified.start == 0: a new sequence; forget any earlier one
    propose(tokens, prefill)   -> a DraftTree, or None for "no draft this step" (a plain step)
    update(step)               after every verify step, drafted or not
    propose(tokens, step) ...

A draft is a TREE of nodes, so it may change shape from step to step (EAGLE-2's dynamic tree, a
lookup chain merged into the heads' tree). Node 0 is the root: the last verified token, which the
base model chose itself and which is not yet in the KV cache. Every other node is a candidate token
whose parent is an earlier node (parents[i] < i), so node indices increase along every path:

    tokens  = [t_root, a, b, c]       node 1 "a" and node 2 "b" follow the root;
    parents = (-1, 0, 0, 1)           node 3 "c" follows "a"

Keep the node order "best first" where you can: the decoder may shrink a draft to its first k
nodes when recent acceptance does not pay for the verify cost (adaptive drafting), and the first k
nodes of a tree whose parents come first are always a valid tree.

Fixed-shape drafts (Medusa's tree) are cheap: the decoder caches tree buffers by `parents`, so
return the same `parents` tuple every step and no buffer is rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DraftTree:
    """A draft of N nodes. tokens: [N] long on the base model's device, tokens[0] the root.
    parents: length N, parents[0] == -1 and parents[i] < i for i > 0."""

    tokens: torch.Tensor
    parents: tuple[int, ...]
    # Free for the proposer: one label per node (e.g. which source of a merged tree proposed it).
    # The decoder does not read it; Verified.nodes indexes it to see who supplied the accepted path.
    sources: tuple[int, ...] | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    def truncated(self, num_nodes: int) -> "DraftTree":
        """The first `num_nodes` nodes (root included): still a tree, since parents come first."""
        if num_nodes >= self.num_nodes:
            return self
        sources = self.sources[:num_nodes] if self.sources is not None else None
        return DraftTree(self.tokens[:num_nodes], self.parents[:num_nodes], sources)


def root_only(root: torch.Tensor | int, device: torch.device | str | None = None) -> DraftTree:
    """The draft of a plain decode step: just the root."""
    return DraftTree(torch.as_tensor([int(root)], dtype=torch.long, device=device), (-1,))


@dataclass
class Verified:
    """What the base model verified in one pass: n tokens now in its KV cache, at positions
    start .. start + n - 1, and the token it chose after them (the next root).

    After the prefill, tokens is the prompt (start == 0, nodes is None). After a verify step,
    tokens is the root and the accepted candidates, and nodes their draft-tree node indices.
    """

    start: int
    tokens: list[int]
    next_token: int
    hidden: torch.Tensor  # [n, hidden_size] the base's final (post-norm) hidden states at those positions
    # [n, len(feature_layers), hidden_size] the base's hidden states after the chosen layers, indexed
    # like transformers' output_hidden_states (0 = embeddings, i = after layer i; HF's last entry is
    # post-norm). None when no proposer asked for any. EAGLE-3's fused input is features.flatten(1).
    features: torch.Tensor | None = None
    nodes: torch.Tensor | None = None  # [n] long, accepted draft node indices, root first; None after prefill

    @property
    def accepted(self) -> int:
        """Candidates accepted in this step (the root and the next token not counted)."""
        return len(self.tokens) - 1 if self.nodes is not None else 0


class Proposer(Protocol):
    """See the module docstring. `feature_layers` empty: `Verified.features` is None (no extra cost)."""

    feature_layers: tuple[int, ...]

    def update(self, verified: Verified) -> None:
        """Learn what the base verified: after the prefill (start == 0: a new sequence) and after
        every verify step. Lookup extends its index here; EAGLE keeps its KV for `nodes`."""

    def propose(self, tokens: list[int], verified: Verified) -> DraftTree | None:
        """tokens: every token so far, prompt first, ending with the root (verified.next_token).
        verified: the latest update's argument, for drafters that read the base's hidden states.
        -> a draft whose root is tokens[-1], or None to decode this step without a draft."""
