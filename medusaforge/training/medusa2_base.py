"""Medusa-2's base model as student and teacher, its base loss, and the base-quality guard.

With LoRA the teacher is the same model with its adapters switched off (peft's `disable_adapter()`),
so no second copy is held; full fine-tuning keeps a frozen copy of the original model as the
teacher (twice the base's weights in memory).
"""

from __future__ import annotations

import copy
import math

import torch

from medusaforge.data.conversations import collate
from medusaforge.models import final_hidden_states, lm_head_of
from medusaforge.training.loss import IGNORE_INDEX, base_targets, linear_cross_entropy
from medusaforge.training.medusa2_loss import linear_kl_divergence


# ---- the base model as student and teacher ---------------------------------------------------


def make_lora_student(base, config):
    """Wrap `base` in LoRA adapters in place; -> the peft model. Only adapter weights train.

    peft injects the adapter layers into `base`'s own modules, so `base(...)` and
    `final_hidden_states(base, ...)` run with the adapters from here on.
    """
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
    )
    return get_peft_model(base, lora_config)


def make_teacher(base, peft_model, base_train: str):
    """-> teacher(input_ids, attention_mask) -> (hidden [B, T, H], lm_head weight [V, H]) of the
    original model, with no gradient.

    LoRA: the student itself with adapters disabled; that is bit for bit the original model.
    Full fine-tuning: the base's weights change in place, so a frozen copy is taken now.
    """
    if base_train == "lora":

        @torch.no_grad()
        def teacher(input_ids, attention_mask):
            with peft_model.disable_adapter():
                return final_hidden_states(base, input_ids, attention_mask), lm_head_of(base).weight

        return teacher
    frozen = copy.deepcopy(base).eval().requires_grad_(False)

    @torch.no_grad()
    def teacher(input_ids, attention_mask):
        return final_hidden_states(frozen, input_ids, attention_mask), lm_head_of(frozen).weight

    return teacher


def base_loss_sum(base, hidden, input_ids, loss_mask, attention_mask, kind: str, teacher, chunk_size: int):
    """Summed L_base over the target (assistant) next-token positions of one micro-batch.

    hidden: [B, T, H] student hidden states. Only positions whose t+1 label counts are projected to
    the vocabulary, one chunk at a time. kind: "ce" (cross entropy on the data) or "distill"
    (KL(original || student) of the next-token distributions).
    """
    labels = base_targets(input_ids, loss_mask)
    selected = labels != IGNORE_INDEX
    weight = lm_head_of(base).weight
    if kind == "ce":
        loss_sum, _, _ = linear_cross_entropy(hidden[selected], weight, labels[selected], chunk_size)
        return loss_sum
    teacher_hidden, teacher_weight = teacher(input_ids, attention_mask)
    return linear_kl_divergence(hidden[selected], weight, teacher_hidden[selected], teacher_weight, chunk_size)


# ---- the quality guard -----------------------------------------------------------------------


@torch.no_grad()
def base_quality(base, data, indices, batch_size, pad_token_id, device, autocast, chunk_size) -> dict:
    """Held-out next-token NLL sum, token count and greedy next tokens [N] over assistant targets."""
    weight = lm_head_of(base).weight
    nll_sum, count, greedy = 0.0, 0, []
    for start in range(0, len(indices), batch_size):
        batch = collate([data.example(i) for i in indices[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = base_targets(batch["input_ids"], batch["loss_mask"])
        selected = labels != IGNORE_INDEX
        with autocast:
            hidden = final_hidden_states(base, batch["input_ids"], batch["attention_mask"])[selected]
        targets = labels[selected]
        for chunk in range(0, hidden.shape[0], chunk_size):
            logits = (hidden[chunk : chunk + chunk_size].float() @ weight.float().T)  # [chunk, vocab]
            nll_sum += float(torch.nn.functional.cross_entropy(logits, targets[chunk : chunk + chunk_size], reduction="sum"))
            greedy.append(logits.argmax(-1).cpu())
        count += int(selected.sum())
    return {"nll_sum": nll_sum, "num_tokens": count, "greedy": torch.cat(greedy) if greedy else torch.zeros(0, dtype=torch.long)}


def quality_report(before: dict, after: dict) -> dict:
    """Perplexities before/after and the share of positions whose greedy next token changed."""
    tokens = max(before["num_tokens"], 1)
    perplexity_before = math.exp(before["nll_sum"] / tokens)
    perplexity_after = math.exp(after["nll_sum"] / tokens)
    changed = (before["greedy"] != after["greedy"]).float().mean().item() if before["num_tokens"] else 0.0
    return {
        "num_tokens": before["num_tokens"],
        "perplexity_before": perplexity_before,
        "perplexity_after": perplexity_after,
        "perplexity_change": perplexity_after / perplexity_before - 1.0,
        "greedy_changed_fraction": changed,
    }
