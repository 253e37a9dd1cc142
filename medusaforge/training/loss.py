"""The Medusa head loss, computed from hidden states without materialising full logits.

Head k at position t is trained on token t+k+2, and only where that *target* token is an
assistant token: against the token itself, against the base's own distribution of that token
(soft targets, `SoftTargets`), or both. The loss is computed per head from the selected positions' hidden states and
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
    """Row sums of two cross entropies of logits x @ weight.T, from one pass over chunks of rows:
      hard: against token targets [N] (IGNORE_INDEX rows add nothing);
      soft: against probability targets, `soft_targets.probabilities(start, end)` -> [rows, vocab]
            fp32, made a chunk at a time (rows may sum to less than 1: see BaseDistribution);
    the objective (1 - soft_weight) * hard + soft_weight * soft, and top-1/top-5 hits against the
    token targets. x: [N, hidden], weight: [vocab, hidden].

    The objective is a sum, so its gradient is known up to one scalar (grad_objective) while the
    chunk's logits are still at hand: forward computes d(objective)/dx and d(objective)/dweight chunk
    by chunk and backward only scales them. That is the same number of matmuls as the plain
    computation (no recomputation), and peak extra memory is one chunk's logits (and soft targets)
    plus the gradient buffers (x-sized, and weight-sized only when the weight trains).
    Only the objective is differentiable; hard and soft sums are returned for reporting.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, chunk_size: int, grad_x_needed: bool, grad_weight_needed: bool,
                soft_targets=None, soft_weight: float = 0.0):
        # Softmax statistics in at least fp32, even when the matmul runs in bf16. Under autocast the
        # matmuls run in its dtype: operands are cast once here, not by autocast at every product.
        accumulate = torch.promote_types(x.dtype, torch.float32)
        matmul_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        hard_weight = 1.0 - soft_weight if soft_targets is not None else 1.0
        objective = torch.zeros((), dtype=accumulate, device=x.device)
        hard_sum = torch.zeros((), dtype=accumulate, device=x.device)
        soft_sum = torch.zeros((), dtype=accumulate, device=x.device)
        top1 = torch.zeros((), dtype=torch.long, device=x.device)
        top5 = torch.zeros((), dtype=torch.long, device=x.device)
        weight_cast = weight.to(matmul_dtype)
        grad_x = torch.empty_like(x) if grad_x_needed else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if grad_weight_needed else None
        for start in range(0, x.shape[0], chunk_size):
            chunk_x = x[start : start + chunk_size].to(matmul_dtype)
            chunk_targets = targets[start : start + chunk_size]
            logits = (chunk_x @ weight_cast.T).to(accumulate)  # [chunk, vocab]
            valid = chunk_targets != IGNORE_INDEX
            rows = torch.arange(len(chunk_targets), device=x.device)[valid]
            safe_targets = chunk_targets[valid]
            best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            hits = (best == chunk_targets.unsqueeze(-1)) & valid.unsqueeze(-1)
            top1 += hits[:, 0].sum()
            top5 += hits.any(-1).sum()
            # Everything that reads the raw logits comes before they become the softmax in place.
            target_logits = logits[rows, safe_targets]
            probabilities = None
            if soft_targets is not None:
                probabilities = soft_targets.probabilities(start, start + len(chunk_targets)).to(accumulate)  # [chunk, vocab]
                mass = probabilities.sum(-1)
                expected_logit = torch.vdot(probabilities.flatten(), logits.flatten())  # sum_v p_v z_v over the chunk
            # logsumexp and softmax from one exp pass: e = exp(z - max), lse = max + log(sum e), softmax = e / sum e.
            largest = logits.amax(dim=-1, keepdim=True)
            exponentials = logits.sub_(largest).exp_()
            total = exponentials.sum(-1)
            log_normaliser = largest.squeeze(-1) + total.log()  # [chunk]
            chunk_hard = (log_normaliser[valid] - target_logits).sum()
            hard_sum += chunk_hard
            if probabilities is not None:
                # -sum_v p_v log q_v = (sum_v p_v) * logsumexp(z) - sum_v p_v z_v
                chunk_soft = (mass * log_normaliser).sum() - expected_logit
                soft_sum += chunk_soft
                objective += hard_weight * chunk_hard + soft_weight * chunk_soft
            else:
                objective += chunk_hard
            if grad_x is None and grad_weight is None:
                continue
            # d(hard)/d logits = softmax - one_hot on valid rows; d(soft)/d logits = mass * softmax - p.
            # One pass turns e into the softmax scaled by each row's factor.
            factor = hard_weight * valid if probabilities is None else hard_weight * valid + soft_weight * mass
            grad_logits = exponentials.mul_((factor / total).unsqueeze(-1))
            if hard_weight:
                grad_logits[rows, safe_targets] -= hard_weight
            if probabilities is not None:
                grad_logits.sub_(probabilities, alpha=soft_weight)
            grad_logits = grad_logits.to(matmul_dtype)
            if grad_x is not None:
                grad_x[start : start + chunk_size] = grad_logits @ weight_cast
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_x).to(accumulate)
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype) if grad_weight is not None else None)
        ctx.mark_non_differentiable(hard_sum, soft_sum, top1, top5)
        return objective, hard_sum, soft_sum, top1, top5

    @staticmethod
    def backward(ctx, grad_objective, _grad_hard, _grad_soft, _grad_top1, _grad_top5):
        grad_x, grad_weight = ctx.saved_tensors
        if grad_x is not None:
            grad_x = grad_x * grad_objective.to(grad_x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_objective.to(grad_weight.dtype)
        return grad_x, grad_weight, None, None, None, None, None, None


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
            _, _, _, top1, top5 = ChunkedLinearCrossEntropy.apply(x, weight, targets, chunk_size, False, False)
        return loss_sum.float(), top1, top5
    loss_sum, _, _, top1, top5 = ChunkedLinearCrossEntropy.apply(
        x, weight, targets, chunk_size, grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad
    )
    return loss_sum, top1, top5


@dataclass
class CrossEntropies:
    """What `linear_cross_entropies` returns: sums over rows, hits against the token targets."""

    objective: torch.Tensor  # (1 - w) * hard + w * soft, differentiable
    hard: torch.Tensor  # against the token targets (detached)
    soft: torch.Tensor  # against the probability targets (detached; 0 without them)
    top1: torch.Tensor
    top5: torch.Tensor


def linear_cross_entropies(x, weight, targets, soft_targets=None, soft_weight: float = 0.0, chunk_size: int = 512) -> CrossEntropies:
    """Hard and soft cross entropies of x @ weight.T in one chunked pass (ChunkedLinearCrossEntropy)."""
    if x.shape[0] == 0:
        zero = x.sum() * 0.0 + weight.sum() * 0.0  # keeps the graph connected for DDP
        nothing = torch.zeros((), dtype=torch.long)
        return CrossEntropies(zero.float(), zero.detach().float(), zero.detach().float(), nothing, nothing)
    grad_enabled = torch.is_grad_enabled()
    return CrossEntropies(*ChunkedLinearCrossEntropy.apply(
        x, weight, targets, chunk_size, grad_enabled and x.requires_grad, grad_enabled and weight.requires_grad,
        soft_targets, soft_weight,
    ))


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


class BaseDistribution:
    """The base model's next-token distribution at some positions, as probability targets for a
    chunked loss, made a chunk of rows at a time so [rows, vocab] never exists for all rows.

    hidden [N, H]: the base's final (post-norm) hidden states at the positions; kept_weight [V', H]:
    the base lm_head rows of the tokens the student predicts (its truncated vocabulary, or all);
    log_normaliser [N]: logsumexp of the base logits over the *full* vocabulary at those positions.
    probabilities -> [rows, V'] = softmax over the full vocabulary, read at the kept tokens.

    With a truncated vocabulary the rows are not renormalised: they sum to the share of the base's
    probability the kept tokens hold. The minimiser of -sum_kept p log q over distributions q on the
    kept tokens is still p renormalised (so nothing is biased), while a position where the base
    expects tokens outside the map weighs less, in proportion to the mass the head can match at all;
    renormalising would give full weight to rows whose kept mass is tiny and noisy. The mass outside
    the map adds no loss (the head puts zero probability there; its cross entropy would be infinite).
    """

    def __init__(self, hidden: torch.Tensor, kept_weight: torch.Tensor, log_normaliser: torch.Tensor, dtype: torch.dtype) -> None:
        self.hidden, self.kept_weight, self.log_normaliser, self.dtype = hidden, kept_weight, log_normaliser, dtype

    @torch.no_grad()
    def probabilities(self, start: int, end: int) -> torch.Tensor:
        logits = (self.hidden[start:end].to(self.dtype) @ self.kept_weight.to(self.dtype).T).float()
        return (logits - self.log_normaliser[start:end].unsqueeze(-1)).exp()


@torch.no_grad()
def full_log_normaliser(hidden: torch.Tensor, lm_head_weight: torch.Tensor, dtype: torch.dtype, chunk_size: int = 512) -> torch.Tensor:
    """[N] logsumexp of hidden [N, H] @ lm_head_weight.T over the whole vocabulary, chunked (fp32 result)."""
    weight = lm_head_weight.to(dtype)
    parts = [torch.logsumexp((hidden[i : i + chunk_size].to(dtype) @ weight.T).float(), dim=-1) for i in range(0, hidden.shape[0], chunk_size)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class SoftTargets:
    """Train the heads against the base's own next-token distribution too (`--soft-targets`).

    lm_head_weight [vocab, H]: the frozen base lm_head; weight: the soft share of each head's loss
    (0 tokens only, 1 the distribution only); log_normaliser [B, T]: the base's logsumexp over the
    full vocabulary at each position of the current micro-batch when a cache holds it (the recipe
    sets it per micro-batch), else None and it is computed here."""

    lm_head_weight: torch.Tensor
    weight: float
    log_normaliser: torch.Tensor | None = None


@dataclass
class HeadLossResult:
    """Per-head sums over the target tokens of one micro-batch. Divide by counts to get means."""

    loss_sums: list[torch.Tensor]  # differentiable, one per head: the objective (tokens, soft targets, or both)
    top1: torch.Tensor  # [num_heads] hit counts (a target outside a truncated vocabulary is a miss)
    top5: torch.Tensor  # [num_heads]
    counts: torch.Tensor  # [num_heads] number of target tokens
    token_loss_sums: torch.Tensor  # [num_heads] cross entropy against the tokens, over predictable ones
    predictable: torch.Tensor  # [num_heads] target tokens inside the head vocabulary (all of them when full)
    soft_loss_sums: torch.Tensor  # [num_heads] cross entropy against the base distribution (0 when off)


def medusa_head_losses(heads, hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor, chunk_size: int = 512,
                       soft: SoftTargets | None = None) -> HeadLossResult:
    """Per-head cross-entropy sums for hidden [B, T, hidden] (post-norm base hidden states).

    Only positions whose target counts are gathered, and they go through the head's ResBlocks and
    projection; nothing of shape [.., vocab] bigger than one chunk is ever held.

    With `soft`, head k at position t is also trained against the base's distribution of token
    t+k+2, which is softmax(lm_head h_{t+k+1}) (h is exactly what the base read to predict it).
    Its normaliser over the full vocabulary comes from the cache (`soft.log_normaliser`) or is
    computed once per position and shared by the heads.
    """
    loss_sums, top1, top5, counts, token_sums, predictable, soft_sums = [], [], [], [], [], [], []
    inverse_map = None
    if heads.token_map is not None:
        # Truncated head vocabulary: targets outside it cannot be predicted; they count as misses.
        inverse_map = torch.full((heads.config.vocab_size,), IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
        inverse_map[heads.token_map.to(input_ids.device)] = torch.arange(len(heads.token_map), device=input_ids.device)
    log_normaliser = None
    if soft is not None:
        # Positions j whose next token is a target of some head (head k's row t reads j = t+k+1).
        needed = base_targets(input_ids, loss_mask) != IGNORE_INDEX
        compute_dtype = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) else hidden.dtype
        if soft.log_normaliser is not None:
            log_normaliser = soft.log_normaliser.to(hidden.device).float()
        else:
            log_normaliser = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
            log_normaliser[needed] = full_log_normaliser(hidden[needed], soft.lm_head_weight, compute_dtype, chunk_size)
        kept_weight = soft.lm_head_weight if heads.token_map is None else soft.lm_head_weight[heads.token_map.to(soft.lm_head_weight.device)]
    for head_index in range(heads.num_heads):
        labels = head_targets(input_ids, loss_mask, head_index)
        selected = labels != IGNORE_INDEX
        targets = labels[selected]
        if inverse_map is not None:
            targets = inverse_map[targets]
        transformed = heads.transform(hidden[selected], head_index)
        weight = heads.projection_weight(head_index)
        if soft is None:
            # Tokens only (Liger's fused kernel where available): the objective is the token loss.
            loss_sum, hits1, hits5 = linear_cross_entropy(transformed, weight, targets, chunk_size)
            result = CrossEntropies(loss_sum, loss_sum.detach(), torch.zeros_like(loss_sum.detach()), hits1, hits5)
        else:
            rows, positions = selected.nonzero(as_tuple=True)
            source = positions + head_index + 1
            distribution = BaseDistribution(hidden[rows, source], kept_weight, log_normaliser[rows, source], compute_dtype)
            result = linear_cross_entropies(transformed, weight, targets, distribution, soft.weight, chunk_size)
        loss_sums.append(result.objective)
        top1.append(result.top1)
        top5.append(result.top5)
        counts.append(selected.sum())
        token_sums.append(result.hard.float())
        predictable.append((targets != IGNORE_INDEX).sum())
        soft_sums.append(result.soft.float())
    return HeadLossResult(loss_sums, torch.stack(top1), torch.stack(top5), torch.stack(counts), torch.stack(token_sums),
                          torch.stack(predictable), torch.stack(soft_sums))


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
