"""The maths of Medusa-2 that is not already in loss.py: the heads-weight warm-up and a chunked KL.

Medusa-2 trains the base model with the heads, on
    loss = base_weight * L_base + heads_weight(step) * sum_k decay**k * L_k.
`heads_weight` starts small so the heads' (large, early) gradients do not pull the base's hidden
states around before the heads have adapted to them. `L_base` keeps the base model what it was:
either cross entropy on the data (loss.linear_cross_entropy) or the KL divergence from the original
model's next-token distribution (`linear_kl_divergence` below), computed like the head loss: from
hidden states and the lm_head weight, on the selected positions only, one chunk of logits at a time.
"""

from __future__ import annotations

import math

import torch

HEADS_WEIGHT_SCHEDULES = ("constant", "linear", "sine")


def heads_weight_at(step: int, total_steps: int, peak: float, schedule: str, warmup_ratio: float) -> float:
    """Weight of the summed head losses at optimizer step `step` (0-based).

    Warm-up lasts warmup_ratio * total_steps steps, after which the weight stays at `peak`:
      constant: peak throughout;
      linear:   peak * step / warmup_steps;
      sine:     peak * sin(pi/2 * step / warmup_steps)  (as Medusa's "sine" scheduler).
    With linear and sine the weight is 0 at step 0, so the first step trains the base alone.
    """
    if schedule not in HEADS_WEIGHT_SCHEDULES:
        raise ValueError(f"unknown heads-weight schedule {schedule!r}; expected one of {HEADS_WEIGHT_SCHEDULES}")
    warmup_steps = warmup_ratio * total_steps
    if schedule == "constant" or warmup_steps <= 0 or step >= warmup_steps:
        return peak
    progress = step / warmup_steps
    if schedule == "linear":
        return peak * progress
    return peak * math.sin(0.5 * math.pi * progress)


class ChunkedLinearKL(torch.autograd.Function):
    """sum over rows of KL(teacher || student), both given as hidden states and projection weights.

    x: [N, hidden] student hidden states, weight: [vocab, hidden] student lm_head;
    teacher_x: [N, hidden'] and teacher_weight: [vocab, hidden'] (no gradient flows to them).
    Row i contributes sum_v p_iv (log p_iv - log q_iv), p = softmax(teacher logits), q = the
    student's. d(KL)/d(student logits) = q - p, the soft-target form of cross entropy's gradient.

    As loss.ChunkedLinearCrossEntropy does, forward computes the gradients chunk by chunk while both
    chunks of logits are at hand, and backward only scales them by the incoming scalar: nothing of
    shape [N, vocab] is ever held, and no logits are recomputed.
    """

    @staticmethod
    def forward(ctx, x, weight, teacher_x, teacher_weight, chunk_size: int, grad_x_needed: bool, grad_weight_needed: bool):
        accumulate = torch.promote_types(x.dtype, torch.float32)  # softmax statistics in >= fp32
        weight_cast = weight.to(x.dtype)
        teacher_weight_cast = teacher_weight.to(teacher_x.dtype)
        kl_sum = torch.zeros((), dtype=accumulate, device=x.device)
        grad_x = torch.empty_like(x) if grad_x_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if grad_weight_needed else None
        for start in range(0, x.shape[0], chunk_size):
            chunk_x = x[start : start + chunk_size]
            student_logprobs = torch.log_softmax((chunk_x @ weight_cast.T).to(accumulate), dim=-1)  # [chunk, vocab]
            teacher_logprobs = torch.log_softmax(
                (teacher_x[start : start + chunk_size] @ teacher_weight_cast.T).to(accumulate), dim=-1
            )
            teacher_probs = teacher_logprobs.exp()
            kl_sum += (teacher_probs * (teacher_logprobs - student_logprobs)).sum()
            if grad_x is None and grad_weight is None:
                continue
            grad_logits = student_logprobs.exp_().sub_(teacher_probs).to(x.dtype)  # q - p
            if grad_x is not None:
                grad_x[start : start + chunk_size] = grad_logits @ weight_cast
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_x).to(accumulate)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        return kl_sum

    @staticmethod
    def backward(ctx, grad_kl):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_kl.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_kl.to(grad_weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None


def linear_kl_divergence(x, weight, teacher_x, teacher_weight, chunk_size: int = 512) -> torch.Tensor:
    """Summed KL(teacher || student) over the rows of x; see ChunkedLinearKL."""
    if x.shape[0] == 0:
        return (x.sum() * 0.0 + weight.sum() * 0.0).float()  # keeps the graph connected
    grad_enabled = torch.is_grad_enabled()
    return ChunkedLinearKL.apply(
        x, weight, teacher_x.detach(), teacher_weight.detach(), chunk_size,
        grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad,
    )
