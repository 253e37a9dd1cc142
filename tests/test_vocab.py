"""Truncated head vocabulary: the kept tokens, their coverage, and every consumer honouring token_map."""

import json

import pytest
import torch
from helpers import learnable_data, save_tiny_model
from transformers import AutoModelForCausalLM

from medusaforge.cli import main
from medusaforge.drafters.medusa_proposer import head_candidates
from medusaforge.drafters.medusa_heads import MedusaHeads, load_heads
from medusaforge.interop.importer import import_heads
from medusaforge.training.loss import linear_cross_entropy, materialized_head_losses, medusa_head_losses
from medusaforge.drafters.vocab import most_frequent_tokens, target_token_counts


def test_counts_only_target_tokens_and_keeps_the_most_frequent():
    input_ids = torch.tensor([[5, 1, 1, 2, 2, 2, 3]])
    loss_mask = torch.tensor([[True, False, True, True, True, True, False]])
    counts = target_token_counts(input_ids, loss_mask, vocab_size=8)
    assert counts.tolist() == [0, 1, 3, 0, 0, 1, 0, 0]
    token_map, coverage = most_frequent_tokens(counts, 2)
    # 2 (3 times), then 1 and 5 tie at once: the lower id wins; ids come back ascending.
    assert token_map.tolist() == [1, 2] and coverage == pytest.approx(4 / 5)
    with pytest.raises(ValueError, match="head-vocab"):
        most_frequent_tokens(counts, 9)


def test_truncated_heads_equal_full_heads_restricted_to_the_map():
    torch.manual_seed(0)
    base_weight = torch.randn(40, 16)
    token_map = torch.tensor([1, 4, 7, 9, 20, 33])
    for shared in (False, True):
        heads = MedusaHeads(16, 40, num_heads=2, head_vocab_size=6, shared_lm_head=shared)
        heads.token_map.copy_(token_map)
        heads.init_from_base(base_weight)
        hidden = torch.randn(3, 16)
        logits = heads.head_logits(hidden, 0)
        assert logits.shape == (3, 40)
        outside = torch.ones(40, dtype=torch.bool)
        outside[token_map] = False
        assert (logits[:, outside] == torch.finfo(logits.dtype).min).all()
        assert heads.projection_weight(0).shape == (6, 16)
        # Decoding proposes full-vocabulary ids from the map.
        candidates = head_candidates(heads, hidden[0], topk=3, num_heads=2)
        assert set(candidates.flatten().tolist()) <= set(token_map.tolist())
        assert candidates[0].tolist() == heads.head_logits(hidden[0], 0).topk(3).indices.tolist()


def test_truncated_loss_equals_plain_loss_on_in_map_targets():
    torch.manual_seed(0)
    heads = MedusaHeads(16, 30, num_heads=2, head_vocab_size=10)
    heads.token_map.copy_(torch.arange(0, 30, 3))
    heads.init_from_base(torch.randn(30, 16))
    hidden = torch.randn(2, 8, 16)
    input_ids = torch.arange(0, 30, 3)[torch.randint(0, 10, (2, 8))]  # every target inside the map
    loss_mask = torch.ones(2, 8, dtype=torch.bool)
    result = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=3)
    plain = materialized_head_losses(heads, hidden, input_ids, loss_mask)
    for loss_sum, count, reference in zip(result.loss_sums, result.counts, plain):
        assert torch.allclose(loss_sum / count, reference, atol=1e-5)


def test_frozen_projection_gets_no_gradient_and_no_grad_mode_computes_none():
    torch.manual_seed(0)
    x = torch.randn(7, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen, as with --shared-lm-head
    targets = torch.randint(0, 20, (7,))
    loss_sum, _, _ = linear_cross_entropy(x, weight, targets, chunk_size=2)
    loss_sum.backward()
    reference_x = x.detach().clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(reference_x @ weight.T, targets, reduction="sum").backward()
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-5) and weight.grad is None
    with torch.no_grad():
        loss_sum, top1, _ = linear_cross_entropy(x, weight, targets, chunk_size=2)
    assert not loss_sum.requires_grad


def test_head_vocab_training_saves_a_token_map_that_export_keeps(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "tiny")
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=16)
    out = tmp_path / "run"
    argv = ["train", "--model", str(model), "--data", str(data), "--out", str(out), "--num-heads", "2",
            "--batch-size", "4", "--max-steps", "3", "--head-vocab", "40", "--progress", "false", "--dtype", "fp32"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.5 < summary["head_vocab_coverage"] <= 1.0
    base = AutoModelForCausalLM.from_pretrained(model)
    heads = load_heads(out / "heads", base=base)
    assert heads.config.head_vocab_size == 40 and heads.heads[0].lm_head.weight.shape == (40, 64)
    assert torch.equal(heads.token_map, torch.sort(heads.token_map).values)
    assert main(["export", "--heads", str(out / "heads"), "--format", "vllm", "--out", str(tmp_path / "vllm")]) == 0
    engine_config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # vLLM 0.32 takes per-head projections only over the full vocabulary: the export widens them and
    # keeps the token map for our own import, which restores the 40-token heads.
    assert engine_config["truncated_vocab_size"] == 320 and engine_config["medusaforge"]["head_vocab_size"] == 40
    assert import_heads(tmp_path / "vllm", base).config.head_vocab_size == 40
