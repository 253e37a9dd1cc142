"""Which tree path the base model accepts. Pure functions over candidate tokens and base logits.

Shapes, with L tree leaves (paths root -> leaf) and D + 1 nodes per path (root included):
  path_tokens:   [L, D + 1] long, the token of each node on each path; -1 pads short paths
  path_logits:   [L, D + 1, V] base logits at each node, i.e. the base's distribution for the
                 token *after* that node
A path's candidate at depth d + 1 is accepted if it is what the base would emit after depth d.
"""

from __future__ import annotations

import torch


def accepted_lengths(path_tokens: torch.Tensor, base_choice: torch.Tensor) -> torch.Tensor:
    """Greedy acceptance. path_tokens, base_choice: [L, D + 1] long -> [L] number of accepted
    candidates per path (root not counted). base_choice[l, d] is the token the base emits after
    node d of path l; it must equal path_tokens[l, d + 1], and every earlier one must have matched."""
    matches = path_tokens[:, 1:] == base_choice[:, :-1]  # [L, D]
    return matches.long().cumprod(dim=-1).sum(dim=-1)


def best_path(lengths: torch.Tensor) -> tuple[int, int]:
    """[L] accepted lengths -> (path index, accepted candidates). Ties go to the first path, which
    for the greedy case makes no difference: equal-length accepted prefixes are the same tokens."""
    best = int(torch.argmax(lengths))  # note: a host sync, once per step
    return best, int(lengths[best])


def typical_threshold(logits: torch.Tensor, temperature: float, epsilon: float, alpha: float) -> torch.Tensor:
    """Medusa's typical acceptance threshold min(epsilon, alpha * exp(-entropy)) per distribution.
    logits: [..., V] -> [...]. A confident (low-entropy) base accepts only likely tokens; an unsure
    one accepts anything above epsilon."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-20))).sum(dim=-1)
    return torch.minimum(torch.full_like(entropy, epsilon), alpha * torch.exp(-entropy))


def typical_accepted_lengths(
    path_tokens: torch.Tensor, path_logits: torch.Tensor, temperature: float, epsilon: float, alpha: float
) -> torch.Tensor:
    """Typical acceptance (temperature > 0): a candidate is accepted if the base gives it probability
    above typical_threshold at its parent. -> [L] accepted candidates per path."""
    probs = torch.softmax(path_logits[:, :-1].float() / temperature, dim=-1)  # [L, D, V]
    candidates = path_tokens[:, 1:]
    candidate_probs = probs.gather(-1, candidates.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [L, D]
    threshold = typical_threshold(path_logits[:, :-1], temperature, epsilon, alpha)
    accepted = (candidate_probs > threshold) & (candidates >= 0)
    return accepted.long().cumprod(dim=-1).sum(dim=-1)


def typical_best_path(lengths: torch.Tensor, path_tokens: torch.Tensor, path_logits: torch.Tensor, temperature: float) -> tuple[int, int]:
    """Among the longest accepted paths, take the one the base finds most likely (Medusa's rule)."""
    longest = int(lengths.max())
    if longest == 0:
        return 0, 0
    logprobs = torch.log_softmax(path_logits[:, :longest].float() / temperature, dim=-1)
    scores = logprobs.gather(-1, path_tokens[:, 1 : longest + 1].clamp(min=0).unsqueeze(-1)).squeeze(-1).sum(-1)
    scores = scores.masked_fill(lengths != longest, float("-inf"))
    return int(torch.argmax(scores)), longest


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[V] logits -> [] token; argmax at temperature 0."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
