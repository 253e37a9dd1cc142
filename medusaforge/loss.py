"""The Medusa head loss, computed from hidden states without materialising full logits.

Head k at position t is trained on token t+k+2, and only where that *target* token is an
assistant token. The loss is computed per head from the selected positions' hidden states and
the head's projection weight, in chunks of tokens, by a custom autograd function that recomputes
each chunk's logits in backward. Peak extra memory is one chunk's logits, not
[num_heads, batch, seq, vocab].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

IGNORE_INDEX = -100


def head_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor, head_index: int) -> torch.Tensor:
    """Labels for head `head_index`: [B, T] with labels[:, t] = input_ids[:, t + head_index + 2] where
    loss_mask[:, t + head_index + 2] (the mask is read at the target position), else IGNORE_INDEX.

    The labels are already shifted: compare them with the logits at the same position, and do not
    shift again.
    """
    offset = head_index + 2
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    if input_ids.shape[1] > offset:
        future_ids = input_ids[:, offset:]
        labels[:, :-offset] = torch.where(loss_mask[:, offset:], future_ids, torch.full_like(future_ids, IGNORE_INDEX))
    return labels


def base_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Labels for the base lm_head (next token, t+1), with the same target-position masking."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(loss_mask[:, 1:], input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE_INDEX))
    return labels


def default_head_weights(num_heads: int, decay: float = 0.8) -> list[float]:
    return [decay**k for k in range(num_heads)]


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(x @ weight.T, targets), plus top-1/top-5 hit counts.

    x: [N, hidden], weight: [vocab, hidden], targets: [N] (IGNORE_INDEX rows contribute nothing).
    Forward keeps only x, weight and targets; backward recomputes each chunk's logits.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size: int):
        loss_sum = torch.zeros((), dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        top1 = torch.zeros((), dtype=torch.long, device=x.device)
        top5 = torch.zeros((), dtype=torch.long, device=x.device)
        weight_cast = weight.to(x.dtype)
        # Softmax statistics in at least fp32, even when the matmul runs in bf16.
        accumulate = torch.promote_types(x.dtype, torch.float32)
        for start in range(0, x.shape[0], chunk_size):
            logits = (x[start : start + chunk_size] @ weight_cast.T).to(accumulate)  # [chunk, vocab]
            chunk_targets = targets[start : start + chunk_size]
            loss_sum += F.cross_entropy(logits, chunk_targets, ignore_index=IGNORE_INDEX, reduction="sum")
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = best == chunk_targets.unsqueeze(-1)
            top1 += hits[:, 0].sum()
            top5 += hits.any(-1).sum()
        ctx.save_for_backward(x, weight, targets)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(top1, top5)
        return loss_sum, top1, top5

    @staticmethod
    def backward(ctx, grad_loss, _grad_top1, _grad_top5):
        x, weight, targets = ctx.saved_tensors
        weight_cast = weight.to(x.dtype)
        accumulate = torch.promote_types(x.dtype, torch.float32)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if ctx.needs_input_grad[1] else None
        for start in range(0, x.shape[0], ctx.chunk_size):
            chunk_x = x[start : start + ctx.chunk_size]
            chunk_targets = targets[start : start + ctx.chunk_size]
            logits = (chunk_x @ weight_cast.T).to(accumulate)
            # d(sum CE)/d logits = softmax - one_hot, zero on ignored rows.
            grad_logits = torch.softmax(logits, dim=-1)
            valid = chunk_targets != IGNORE_INDEX
            grad_logits[valid, chunk_targets[valid]] -= 1.0
            grad_logits[~valid] = 0.0
            grad_logits = (grad_logits * grad_loss).to(x.dtype)
            if grad_x is not None:
                grad_x[start : start + ctx.chunk_size] = grad_logits @ weight_cast
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_x).to(accumulate)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None


def linear_cross_entropy(x, weight, targets, chunk_size: int = 512):
    """(loss_sum, top1_hits, top5_hits) of logits x @ weight.T against targets, chunked."""
    if x.shape[0] == 0:
        zero = x.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph connected for DDP
        return zero.float(), torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    return ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size)


@dataclass
class HeadLossResult:
    """Per-head sums over the target tokens of one micro-batch. Divide by counts to get means."""

    loss_sums: list[torch.Tensor]  # differentiable, one per head
    top1: torch.Tensor  # [num_heads] hit counts
    top5: torch.Tensor  # [num_heads]
    counts: torch.Tensor  # [num_heads] number of target tokens


def medusa_head_losses(heads, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 512) -> HeadLossResult:
    """Per-head cross-entropy sums for hidden [B, T, hidden] (post-norm base hidden states).

    Only positions whose target counts are gathered, and they go through the head's ResBlocks and
    projection; nothing of shape [.., vocab] bigger than one chunk is ever held.
    """
    loss_sums, top1, top5, counts = [], [], [], []
    inverse_map = None
    if heads.token_map is not None:
        # Truncated head vocabulary: targets outside it cannot be predicted; they count as misses.
        inverse_map = torch.full((heads.config.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        inverse_map[heads.token_map.to(input_ids.device)] = torch.arange(len(heads.token_map), device=input_ids.device)
    for head_index in range(heads.num_heads):
        labels = head_targets(input_ids, loss_mask, head_index)
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        if inverse_map is not None:
            targets = inverse_map[targets]
        transformed = heads.transform(hidden[selected], head_index)
        loss_sum, hits1, hits5 = linear_cross_entropy(transformed, heads.projection_weight(head_index), targets, chunk_size)
        loss_sums.append(loss_sum)
        top1.append(hits1)
        top5.append(hits5)
        counts.append(selected.sum())
    return HeadLossResult(loss_sums, torch.stack(top1), torch.stack(top5), torch.stack(counts))


def materialized_head_losses(heads, hidden, input_ids, loss_mask) -> list[torch.Tensor]:
    """The plain way most tutorials write it: full [B, T, vocab] logits per head, then mean CE.

    Kept as the reference for tests and the training benchmark, not for training.
    """
    losses = []
    for head_index in range(heads.num_heads):
        logits = heads.head_logits(hidden, head_index)
        labels = head_targets(input_ids, loss_mask, head_index)
        losses.append(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX))
    return losses
