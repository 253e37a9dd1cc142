"""EAGLE-3 loss: at every unrolled step, cross-entropy against the base's own next-token
distribution restricted to the draft vocabulary, weighted 0.8**k as in the EAGLE-3 paper.

Alignment (see drafters/eagle3.py): draft step k at position i predicts token t_{i+2+k}; its target
is the base distribution at position i+1+k. `loss_mask` is data/conversations' mask, True on
assistant tokens and *not* shifted; the shift by 2+k happens here, once, so a position counts at
step k exactly when token i+2+k is an assistant token (the same rule as Medusa head k).

Top-1 is measured as greedy decoding accepts: the draft's argmax, mapped to a base token id, must
equal the base's argmax over the *full* vocabulary (a base choice outside the draft vocabulary is
a miss, as it is at decoding time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from medusaforge.training.loss import IGNORE_INDEX, linear_cross_entropies


def step_weights(num_steps: int, decay: float = 0.8) -> list[float]:
    return [decay**k for k in range(num_steps)]


def step_positions(loss_mask: torch.Tensor, step: int) -> torch.Tensor:
    """bool [B, T]: positions i that count at draft step `step`, i.e. token i+2+step is an assistant token."""
    shift = 2 + step
    valid = torch.zeros_like(loss_mask, dtype=torch.bool)
    if shift < loss_mask.shape[1]:
        valid[:, :-shift] = loss_mask[:, shift:].bool()
    return valid


def soft_cross_entropy(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """[N]: -sum_v softmax(target)_v * log_softmax(draft)_v, both over the draft vocabulary, in fp32
    (the plain form, kept as the reference for tests; training goes through the chunked loss)."""
    target = torch.softmax(target_logits.float(), dim=-1)
    return -(target * torch.log_softmax(draft_logits.float(), dim=-1)).sum(-1)


class GatheredTargets:
    """Soft targets of one draft step, gathered and softmaxed a chunk of rows at a time:
    softmax(target_logits[rows, positions]) over the draft vocabulary ([N, draft_vocab] is never
    held for all rows; the chunked loss asks for rows start:end)."""

    def __init__(self, target_logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> None:
        self.target_logits, self.rows, self.positions = target_logits, rows, positions

    @torch.no_grad()
    def probabilities(self, start: int, end: int) -> torch.Tensor:
        return torch.softmax(self.target_logits[self.rows[start:end], self.positions[start:end]].float(), dim=-1)


@dataclass
class Eagle3LossResult:
    loss_sums: list[torch.Tensor]  # [steps] scalar sums over counted positions (with grad)
    top1: torch.Tensor  # [steps] correct greedy predictions
    counts: torch.Tensor  # [steps] counted positions


def draft_ids_of(draft, base_ids: torch.Tensor) -> torch.Tensor:
    """Base-vocabulary ids -> draft-vocabulary ids, IGNORE_INDEX for a token outside the draft vocabulary."""
    draft_vocab = draft.lm_head.weight.shape[0]
    inverse = torch.full((draft.t2d.shape[0],), IGNORE_INDEX, dtype=torch.long, device=base_ids.device)
    inverse[draft.to_target(torch.arange(draft_vocab, device=base_ids.device))] = torch.arange(draft_vocab, device=base_ids.device)
    return inverse[base_ids]


def eagle3_losses(
    draft,
    hiddens: list[torch.Tensor],
    target_logits: torch.Tensor,
    base_argmax: torch.Tensor,
    loss_mask: torch.Tensor,
    chunk_size: int = 512,
) -> Eagle3LossResult:
    """Per-step loss sums, top-1 hits and counts.

    draft: an Eagle3Draft (its `norm`, `lm_head` and vocabulary maps); hiddens: `draft.unroll`
    output, [steps] of [B, T, H]; target_logits [B, T, draft_vocab]: the base logits at the draft
    vocabulary's tokens; base_argmax [B, T]: the base's full-vocabulary argmax; loss_mask [B, T] as
    described above.

    Each step's loss runs chunk by chunk through loss.ChunkedLinearCrossEntropy, which computes the
    lm_head gradients while a chunk's logits are at hand: no step keeps [N, draft_vocab] logits (or
    their softmax) for backward, which is what made unrolled steps cost gigabytes."""
    loss_sums, top1, counts = [], [], []
    for step, hidden in enumerate(hiddens):
        rows, positions = step_positions(loss_mask, step).nonzero(as_tuple=True)
        # Only counted positions reach the lm_head: [N, H] -> chunks of [chunk, draft_vocab].
        normed = draft.norm(hidden[rows, positions])
        # Greedy acceptance: the draft's argmax must be the base's full-vocabulary argmax; a base
        # choice outside the draft vocabulary maps to IGNORE_INDEX and is a miss.
        greedy = draft_ids_of(draft, base_argmax[rows, positions + 1 + step])
        targets = GatheredTargets(target_logits, rows, positions + 1 + step)
        result = linear_cross_entropies(normed, draft.lm_head.weight, greedy, targets, 1.0, chunk_size)
        loss_sums.append(result.objective)
        top1.append(result.top1.detach())
        counts.append(torch.tensor(len(rows)))
    return Eagle3LossResult(loss_sums, torch.stack(top1).float().cpu(), torch.stack(counts).float())


def plain_step_loss(draft_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Reference for tests: torch's cross_entropy with probability targets, summed."""
    return F.cross_entropy(draft_logits.float(), torch.softmax(target_logits.float(), -1), reduction="sum")
