"""Speculative sampling: accept drafted tokens so that the output is distributed exactly as the
base model samples it (lossless in distribution), for a chain and for a tree.

The one rule (Leviathan et al. 2023; Chen et al. 2023), for a candidate x drawn from a draft
distribution q where the base's distribution is p:
  accept x with probability min(1, p(x) / q(x));
  on rejection the base's token comes from the residual norm(max(p - q, 0)).
For a tree (SpecInfer, EAGLE) the siblings under one node are tried one after the other; each
rejection replaces p by its residual, so the next sibling is judged against what is left
(recursive rejection sampling). If every sibling is rejected, the token is sampled from the last
residual. Induction over the siblings shows the emitted token is distributed exactly as p.

A candidate chosen deterministically (EAGLE-2's top-k expansion) was "drawn" from a one-hot q: it
is accepted with probability p(x), and the residual is p with x removed, renormalised. Pass
`draft_probs=None` for that case; EAGLE's own code does the same (q(x) = 1).

Shapes: V vocabulary, N tree nodes, m siblings.
  p, q:          [V] float probabilities (not logits)
  tree_tokens:   [N] long, node 0 the root (already emitted), parents before children
  tree_parents:  [N] long, parent node index, -1 for the root
  target_probs:  [N, V] the base's distribution for the token *after* each node
  draft_probs:   [N, V] or None: the distribution node i was drawn from (row 0 unused)
"""

from __future__ import annotations

import torch


def target_distribution(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities at `temperature` (> 0)."""
    if temperature <= 0:
        raise ValueError("speculative sampling needs temperature > 0; temperature 0 is greedy")
    return torch.softmax(logits.float() / temperature, dim=-1)


def acceptance_probability(p: torch.Tensor, q: torch.Tensor, token: int) -> torch.Tensor:
    """min(1, p(x) / q(x)) for a candidate x drawn from q. [] float."""
    q_token = q[token]
    if q_token <= 0:
        raise ValueError(f"token {token} has draft probability 0, so it cannot have been drawn from q")
    return torch.clamp(p[token] / q_token, max=1.0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(p - q, 0)): what the base still needs after a candidate from q is rejected.
    When p == q (nothing left) a rejection cannot happen; p is returned so callers need no branch."""
    residual = torch.clamp(p - q, min=0.0)
    total = residual.sum()
    return residual / total if total > 0 else p


def one_hot(token: int, like: torch.Tensor) -> torch.Tensor:
    q = torch.zeros_like(like)
    q[token] = 1.0
    return q


def choose_among_siblings(
    p: torch.Tensor,
    candidates: list[int],
    draft_probs: list[torch.Tensor] | None,
    uniforms: torch.Tensor,
) -> tuple[int, torch.Tensor]:
    """Recursive rejection sampling over one node's children.

    p: [V] base distribution at the node; candidates: the children's tokens in the order to try;
    draft_probs: one [V] distribution per candidate (what it was drawn from), or None for
    deterministic candidates; uniforms: [len(candidates)] in [0, 1).
    -> (index of the accepted candidate, or -1; the distribution to sample from if -1).
    """
    for i, token in enumerate(candidates):
        q = one_hot(token, p) if draft_probs is None else draft_probs[i]
        if uniforms[i] < acceptance_probability(p, q, token):
            return i, p
        p = residual_distribution(p, q)
    return -1, p


def chain_accept(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Speculative sampling over a chain of K drafted tokens.

    draft_tokens: [K]; target_probs: [K + 1, V], row k the base's distribution after k drafted
    tokens; draft_probs: [K, V] each token's draft distribution, or None (deterministic drafts).
    -> (number of accepted drafted tokens, the next token from the base).
    """
    parents = torch.arange(-1, len(draft_tokens))
    tokens = torch.cat([draft_tokens.new_zeros(1), draft_tokens])  # node 0 stands for the context
    probs = None if draft_probs is None else torch.cat([draft_probs[:1], draft_probs])
    path, token = tree_accept(tokens, parents, target_probs, probs, generator)
    return len(path) - 1, token


def tree_accept(
    tree_tokens: torch.Tensor,
    tree_parents: torch.Tensor,
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[int], int]:
    """Walk the tree from the root, at each node choosing among its children by recursive
    rejection sampling. -> (accepted node indices, root first; the base's next token after the
    last accepted node). Children are tried in node order (the proposer's best first)."""
    parents = tree_parents.tolist()  # note: a host sync, once per step
    tokens = tree_tokens.tolist()
    children: dict[int, list[int]] = {}
    for node, parent in enumerate(parents):
        if parent >= 0:
            children.setdefault(parent, []).append(node)
    path = [0]
    while True:
        node = path[-1]
        p = target_probs[node].float()
        kids = children.get(node, [])
        uniforms = torch.rand(len(kids), generator=generator, device=p.device)
        q = None if draft_probs is None else [draft_probs[k].float() for k in kids]
        chosen, residual = choose_among_siblings(p, [tokens[k] for k in kids], q, uniforms)
        if chosen < 0:
            next_token = torch.multinomial(residual, 1, generator=generator)
            return path, int(next_token)
        path.append(kids[chosen])
