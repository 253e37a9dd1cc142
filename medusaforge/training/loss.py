"""The Medusa head loss, computed from hidden states without materialising full logits.

Head k at position t is trained on token t+k+2, and only where that *target* token is an
assistant token. The loss is computed per head from the selected positions' hidden states and
the head's projection weight, in chunks of tokens, by a custom autograd function that computes
each chunk's gradients while its logits are at hand. Peak extra memory is one chunk's logits, not
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

    The loss is a sum, so its gradient is known up to one scalar (grad_loss) while the chunk's
    logits are still at hand: forward computes d(loss)/dx and d(loss)/dweight chunk by chunk and
    backward only scales them. That is the same number of matmuls as the plain computation (no
    recomputation), and peak extra memory is one chunk's logits plus the gradient buffers
    (x-sized, and weight-sized only when the weight trains).
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size: int, grad_x_needed: bool, grad_weight_needed: bool):
        # Softmax statistics in at least fp32, even when the matmul runs in bf16.
        accumulate = torch.promote_types(x.dtype, torch.float32)
        loss_sum = torch.zeros((), dtype=accumulate, device=x.device)
        top1 = torch.zeros((), dtype=torch.long, device=x.device)
        top5 = torch.zeros((), dtype=torch.long, device=x.device)
        weight_cast = weight.to(x.dtype)
        grad_x = torch.empty_like(x) if grad_x_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if grad_weight_needed else None
        for start in range(0, x.shape[0], chunk_size):
            chunk_x = x[start : start + chunk_size]
            chunk_targets = targets[start : start + chunk_size]
            logits = (chunk_x @ weight_cast.T).to(accumulate)  # [chunk, vocab]
            valid = chunk_targets != IGNORE_INDEX
            rows = torch.arange(len(chunk_targets), device=x.device)[valid]
            safe_targets = chunk_targets[valid]
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = (best == chunk_targets.unsqueeze(-1)) & valid.unsqueeze(-1)
            top1 += hits[:, 0].sum()
            top5 += hits.any(-1).sum()
            log_normaliser = torch.logsumexp(logits, dim=-1)  # [chunk]
            loss_sum += (log_normaliser[valid] - logits[rows, safe_targets]).sum()
            if grad_x is None and grad_weight is None:
                continue
            # d(sum CE)/d logits = softmax - one_hot, zero on ignored rows; computed in place.
            grad_logits = logits.sub_(log_normaliser.unsqueeze(-1)).exp_()
            grad_logits[rows, safe_targets] -= 1.0
            grad_logits[~valid] = 0.0
            grad_logits = grad_logits.to(x.dtype)
            if grad_x is not None:
                grad_x[start : start + chunk_size] = grad_logits @ weight_cast
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_x).to(accumulate)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        ctx.mark_non_differentiable(top1, top5)
        return loss_sum, top1, top5

    @staticmethod
    def backward(ctx, grad_loss, _grad_top1, _grad_top5):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_loss.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_x, grad_weight, None, None, None, None


def linear_cross_entropy(x, weight, targets, chunk_size: int = 512):
    """(loss_sum, top1_hits, top5_hits) of logits x @ weight.T against targets, chunked.

    On CUDA with Liger-Kernel installed, the loss and its gradients come from Liger's fused
    kernel; the hit counts are then taken in a separate no-grad pass.
    """
    if x.shape[0] == 0:
        zero = x.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph connected for DDP
        return zero.float(), torch.zeros((), dtype=torch.long), torch.zeros((), dtype=torch.long)
    grad_enabled = torch.is_grad_enabled()
    if x.is_cuda and liger_fused_linear_cross_entropy() is not None:
        loss_sum = liger_fused_linear_cross_entropy()(weight.to(x.dtype), x, targets)
        with torch.no_grad():
            _, top1, top5 = ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size, False, False)
        return loss_sum.float(), top1, top5
    return ChunkedLinearCrossEntropy.apply(
        x, weight, targets, chunk_size, grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad
    )


_LIGER_LOSS: list = []


def liger_fused_linear_cross_entropy():
    """Liger-Kernel's fused linear cross entropy (reduction 'sum') when installed, else None.
    Imported lazily and once: Liger needs Triton and a GPU, which CPU installs do not have."""
    if not _LIGER_LOSS:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            _LIGER_LOSS.append(LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum"))
        except Exception:  # ImportError, or Triton failing to initialise without a GPU
            _LIGER_LOSS.append(None)
    return _LIGER_LOSS[0]


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
