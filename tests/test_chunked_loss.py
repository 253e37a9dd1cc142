"""Chunked losses equal their unchunked form, gradients included: the EAGLE-3 step loss (which no
longer keeps any step's [N, draft_vocab] logits for backward) and the heads' soft-target loss."""

import pytest
import torch

from helpers import tiny_llama
from medusaforge.drafters.draft_vocab import vocab_maps
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.training.eagle3_loss import eagle3_losses, plain_step_loss, step_positions
from medusaforge.training.loss import SoftTargets, medusa_head_losses


def draft_and_batch():
    base = tiny_llama(64, hidden_size=32)
    torch.manual_seed(0)
    draft = Eagle3Draft(draft_config_from_base(base.config, 16, (0, 1, 2)), base.get_input_embeddings())
    draft.set_vocab(*vocab_maps(torch.arange(16) * 4, 64))
    ids = torch.randint(0, 64, (2, 9))
    mask = torch.rand(2, 9) > 0.3
    features = torch.randn(2, 9, 96)
    full_logits = torch.randn(2, 9, 64)
    return draft, ids, mask, features, full_logits


def unchunked_eagle3_loss(draft, ids, mask, features, full_logits, num_steps, weights):
    """The plain form: every step's full logits kept for autograd."""
    token_map = draft.to_target(torch.arange(16))
    hiddens = draft.unroll(ids, draft.fuse(features), num_steps)
    total = torch.zeros(())
    for k, hidden in enumerate(hiddens):
        rows, positions = step_positions(mask, k).nonzero(as_tuple=True)
        logits = draft.logits(hidden[rows, positions])
        total = total + weights[k] * plain_step_loss(logits, full_logits[rows, positions + 1 + k][:, token_map])
    return total


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_eagle3_chunked_step_loss_equals_unchunked_with_gradients(chunk_size):
    draft, ids, mask, features, full_logits = draft_and_batch()
    token_map = draft.to_target(torch.arange(16))
    weights = [1.0, 0.8, 0.64]
    hiddens = draft.unroll(ids, draft.fuse(features), 3)
    result = eagle3_losses(draft, hiddens, full_logits[..., token_map], full_logits.argmax(-1), mask, chunk_size)
    chunked = sum(w * s for w, s in zip(weights, result.loss_sums))
    chunked.backward()
    ours = {name: p.grad.clone() for name, p in draft.named_parameters()}
    draft.zero_grad()
    reference = unchunked_eagle3_loss(draft, ids, mask, features, full_logits, 3, weights)
    reference.backward()
    assert chunked.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in draft.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk_size", [1, 5])
def test_head_soft_target_loss_is_the_same_at_every_chunk_size(chunk_size):
    torch.manual_seed(0)
    heads = MedusaHeads(16, 40, num_heads=2, num_layers=1, head_vocab_size=12)
    heads.token_map.copy_(torch.arange(0, 36, 3))
    lm_head = torch.randn(40, 16)
    heads.init_from_base(lm_head)
    for p in heads.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    hidden, ids, mask = torch.randn(3, 10, 16), torch.randint(0, 40, (3, 10)), torch.rand(3, 10) > 0.2
    soft = SoftTargets(lm_head, 0.5)

    def loss_and_grads(chunk):
        heads.zero_grad()
        result = medusa_head_losses(heads, hidden, ids, mask, chunk_size=chunk, soft=soft)
        sum(result.loss_sums).backward()
        return result, [p.grad.clone() for p in heads.parameters()]

    unchunked, unchunked_grads = loss_and_grads(10_000)  # one chunk holds every row
    chunked, chunked_grads = loss_and_grads(chunk_size)
    for a, b in zip(chunked.loss_sums, unchunked.loss_sums):
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    torch.testing.assert_close(chunked.soft_loss_sums, unchunked.soft_loss_sums)
    for a, b in zip(chunked_grads, unchunked_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
