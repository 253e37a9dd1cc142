"""Heads and loss against hand-worked examples and the traps public Medusa write-ups fall into."""

import json

import pytest
import torch
from helpers import tiny_llama
from torch.nn import functional as F

from medusaforge.drafters.medusa_heads import MedusaHeads, load_heads
from medusaforge.training.loss import (
    IGNORE_INDEX,
    base_targets,
    default_head_weights,
    head_targets,
    linear_cross_entropy,
    materialized_head_losses,
    medusa_head_losses,
)
from medusaforge.models import base_fingerprint, check_lm_head_reads_final_hidden, final_hidden_states


def test_resblocks_start_as_identity_and_heads_as_lm_head_copies():
    base = tiny_llama(64)
    heads = MedusaHeads(64, 64, num_heads=3, num_layers=2)
    heads.init_from_base(base.lm_head.weight)
    for head in heads.heads:
        for block in head.blocks:
            assert torch.count_nonzero(block.linear.weight) == 0
    hidden = torch.randn(2, 5, 64)
    # With W = 0 each block adds SiLU(b), a constant; the head starts as lm_head of a shifted input.
    for k, head in enumerate(heads.heads):
        shifted = hidden
        for block in head.blocks:
            shifted = shifted + F.silu(block.linear.bias)
        assert torch.allclose(heads.head_logits(hidden, k), base.lm_head(shifted), atol=1e-5)
    assert heads(hidden).shape == (3, 2, 5, 64)


def test_every_layer_and_head_has_its_own_weights():
    heads = MedusaHeads(16, 32, num_heads=3, num_layers=3)
    pointers = [p.data_ptr() for p in heads.parameters()]
    assert len(pointers) == len(set(pointers))
    # 3 heads x (3 blocks x (weight + bias) + lm_head)
    assert len(pointers) == 3 * (3 * 2 + 1)
    first_block = heads.heads[0].blocks[0]
    with torch.no_grad():
        first_block.linear.weight.add_(1.0)
    assert torch.count_nonzero(heads.heads[0].blocks[1].linear.weight) == 0
    assert torch.count_nonzero(heads.heads[1].blocks[0].linear.weight) == 0


def test_head_k_label_is_token_t_plus_k_plus_2_on_a_hand_made_sequence():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    loss_mask = torch.ones_like(input_ids, dtype=torch.bool)
    x = IGNORE_INDEX
    assert head_targets(input_ids, loss_mask, 0).tolist() == [[12, 13, 14, 15, x, x]]
    assert head_targets(input_ids, loss_mask, 1).tolist() == [[13, 14, 15, x, x, x]]
    assert head_targets(input_ids, loss_mask, 3).tolist() == [[15, x, x, x, x, x]]
    assert base_targets(input_ids, loss_mask).tolist() == [[11, 12, 13, 14, 15, x]]
    # Labels are not shifted a second time: a sequence shorter than the offset has no targets.
    assert head_targets(input_ids[:, :2], loss_mask[:, :2], 0).tolist() == [[x, x]]


def test_mask_is_read_at_target_positions():
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15]])
    # Positions 0-2 are the prompt, 3-5 the assistant reply.
    loss_mask = torch.tensor([[False, False, False, True, True, True]])
    x = IGNORE_INDEX
    # Head 0 at t=1 predicts token 3 (assistant), so t=1 counts although token 1 is a prompt token;
    # t=3 predicts token 5 and counts; t=4 would predict beyond the end.
    assert head_targets(input_ids, loss_mask, 0).tolist() == [[x, 13, 14, 15, x, x]]
    assert head_targets(input_ids, loss_mask, 1).tolist() == [[13, 14, 15, x, x, x]]
    # A prompt token is never a target, even when read from an assistant position.
    reply_then_user = torch.tensor([[True, True, True, False, False, False]])
    assert head_targets(input_ids, reply_then_user, 0).tolist() == [[12, x, x, x, x, x]]


def test_default_head_weights_decay():
    assert default_head_weights(3) == pytest.approx([1.0, 0.8, 0.64])


@pytest.mark.parametrize("chunk_size", [1, 3, 64])
def test_chunked_loss_equals_plain_cross_entropy_and_gradients(chunk_size):
    torch.manual_seed(0)
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 40, (10,))
    targets[3] = IGNORE_INDEX
    loss_sum, top1, top5 = linear_cross_entropy(x, weight, targets, chunk_size)
    (2.5 * loss_sum).backward()
    grad_x, grad_weight = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    logits = x @ weight.T
    reference = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (2.5 * reference).backward()
    assert torch.allclose(loss_sum.double(), reference, rtol=1e-6)
    assert torch.allclose(grad_x, x.grad, atol=1e-10) and torch.allclose(grad_weight, weight.grad, atol=1e-10)
    valid = targets != IGNORE_INDEX
    assert int(top1) == int((logits.argmax(-1) == targets)[valid].sum())
    assert int(top5) == int((logits.topk(5).indices == targets[:, None]).any(-1)[valid].sum())


def test_head_loss_matches_materialized_logits():
    torch.manual_seed(0)
    heads = MedusaHeads(16, 50, num_heads=3, num_layers=1)
    heads.init_from_base(torch.randn(50, 16))
    for p in heads.parameters():
        p.data.normal_(0, 0.1)
    hidden = torch.randn(2, 9, 16)
    input_ids = torch.randint(0, 50, (2, 9))
    loss_mask = torch.rand(2, 9) > 0.3
    result = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=4)
    ours = [s / c for s, c in zip(result.loss_sums, result.counts)]
    sum(ours).backward()
    ours_grads = [p.grad.clone() for p in heads.parameters()]
    heads.zero_grad()
    plain = materialized_head_losses(heads, hidden, input_ids, loss_mask)
    sum(plain).backward()
    for a, b in zip(ours, plain):
        assert torch.allclose(a, b, atol=1e-5)
    for a, p in zip(ours_grads, heads.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-5)


def test_lm_head_reads_final_hidden_state():
    base = tiny_llama(64)
    check_lm_head_reads_final_hidden(base)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(base.lm_head(final_hidden_states(base, ids)), base(ids).logits, atol=1e-5)


def test_model_with_logits_not_from_final_hidden_is_refused():
    base = tiny_llama(64)
    base.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capped"):
        check_lm_head_reads_final_hidden(base)


def test_checkpoint_round_trip_reproduces_logits_bit_for_bit(tmp_path):
    base = tiny_llama(64)
    heads = MedusaHeads(64, 64, num_heads=2, num_layers=2, base_model="tiny")
    heads.init_from_base(base.lm_head.weight)
    for p in heads.parameters():
        p.data.normal_()  # trained-looking weights, including the projections
    heads.config.base_fingerprint = base_fingerprint(base)
    heads.save(tmp_path / "heads")
    loaded = load_heads(tmp_path / "heads", base=base)
    hidden = torch.randn(3, 4, 64)
    assert torch.equal(heads(hidden), loaded(hidden))
    # The trained projection is saved, not re-copied from the base lm_head at load time.
    assert not torch.equal(loaded.heads[0].lm_head.weight, base.lm_head.weight)
    config = json.loads((tmp_path / "heads" / "config.json").read_text())
    assert {k: config[k] for k in ("num_heads", "num_layers", "hidden_size", "vocab_size", "base_model")} == {
        "num_heads": 2, "num_layers": 2, "hidden_size": 64, "vocab_size": 64, "base_model": "tiny"
    }


def test_heads_for_another_base_are_refused(tmp_path):
    base = tiny_llama(64)
    heads = MedusaHeads(64, 64, num_heads=2)
    heads.config.base_fingerprint = base_fingerprint(base)
    heads.save(tmp_path / "heads")
    with pytest.raises(ValueError, match="vocab_size 64 != base 80"):
        load_heads(tmp_path / "heads", base=tiny_llama(80))
    with pytest.raises(ValueError, match="hidden_size 64 != base 32"):
        load_heads(tmp_path / "heads", base=tiny_llama(64, hidden_size=32))
    with pytest.raises(ValueError, match="different base weights"):
        load_heads(tmp_path / "heads", base=tiny_llama(64, seed=1))
    assert load_heads(tmp_path / "heads", base=tiny_llama(64, seed=1), allow_other_base=True).num_heads == 2


def test_truncated_safetensors_is_refused_with_file_name(tmp_path):
    heads = MedusaHeads(16, 32, num_heads=2)
    heads.save(tmp_path / "heads")
    weights = tmp_path / "heads" / "heads.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="heads.safetensors"):
        load_heads(tmp_path / "heads")
