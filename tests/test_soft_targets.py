"""Soft targets for the heads (training/loss.py): the chunked loss against probability targets on
hand-worked logits, against torch's cross entropy with probability targets, and the heads' loss
against the base's own distribution of token t+k+2, softmax(lm_head h_{t+k+1}); and the token loss
reported over the targets a truncated head vocabulary can predict."""

import math

import pytest
import torch
from torch.nn import functional as F

from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.training.common import evaluate_heads
from medusaforge.training.loss import IGNORE_INDEX, SoftTargets, head_targets, linear_cross_entropies, medusa_head_losses


class FixedTargets:
    """Probability rows given up front (the chunked loss asks for rows start:end)."""

    def __init__(self, probabilities):
        self.rows = probabilities

    def probabilities(self, start, end):
        return self.rows[start:end]


def test_soft_loss_on_hand_worked_logits():
    # Logits [0, ln 3] -> q = [1/4, 3/4]; logits [0, 0] -> q = [1/2, 1/2].
    x = torch.tensor([[0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    p = torch.tensor([[0.25, 0.75], [0.25, 0.75]])
    result = linear_cross_entropies(x, weight, torch.tensor([IGNORE_INDEX, IGNORE_INDEX]), FixedTargets(p), 1.0, chunk_size=1)
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert result.soft.item() == pytest.approx(entropy + math.log(2.0), rel=1e-6)
    assert result.objective.item() == pytest.approx(entropy + math.log(2.0), rel=1e-6)
    assert result.hard.item() == 0.0  # no token targets
    # The same as torch's cross entropy with probability targets, summed.
    assert result.soft.item() == pytest.approx(F.cross_entropy(x.detach() @ weight.T, p, reduction="sum").item(), rel=1e-6)
    # Rows that hold only part of the probability (a truncated vocabulary): p = [0.2, 0.6], mass 0.8.
    # -(0.2 ln 1/4 + 0.6 ln 3/4) = 0.449868; q = [1/4, 3/4] is p renormalised, so the gradient is zero there.
    partial = linear_cross_entropies(x[:1], weight, torch.tensor([IGNORE_INDEX]), FixedTargets(torch.tensor([[0.2, 0.6]])), 1.0, 1)
    assert partial.soft.item() == pytest.approx(0.449868, abs=1e-6)
    x.grad = None
    partial.objective.backward()
    assert torch.allclose(x.grad, torch.zeros_like(x), atol=1e-7)


@pytest.mark.parametrize("soft_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_hard_plus_soft_equals_torch_cross_entropies_with_gradients(soft_weight, chunk_size):
    torch.manual_seed(0)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (9,))
    targets[[2, 5]] = IGNORE_INDEX
    p = torch.softmax(torch.randn(9, 11, dtype=torch.float64), -1) * 0.9  # 10% of each row's mass outside
    result = linear_cross_entropies(x, weight, targets, FixedTargets(p), soft_weight, chunk_size)
    (1.7 * result.objective).backward()
    ours = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    logits = x @ weight.T
    hard = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    soft = -(p * torch.log_softmax(logits, -1)).sum()
    (1.7 * ((1 - soft_weight) * hard + soft_weight * soft)).backward()
    assert result.hard.item() == pytest.approx(hard.item(), rel=1e-9)
    assert result.soft.item() == pytest.approx(soft.item(), rel=1e-9)
    torch.testing.assert_close(ours[0], x.grad)
    torch.testing.assert_close(ours[1], weight.grad)


def heads_and_batch(head_vocab=None):
    torch.manual_seed(0)
    heads = MedusaHeads(16, 30, num_heads=3, num_layers=1, head_vocab_size=head_vocab)
    if head_vocab is not None:
        heads.token_map.copy_(torch.arange(0, 30, 30 // head_vocab)[:head_vocab])
    lm_head = torch.randn(30, 16)
    heads.init_from_base(lm_head)
    for p in heads.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(2, 9, 16)
    input_ids = torch.randint(0, 30, (2, 9))
    loss_mask = torch.rand(2, 9) > 0.25
    return heads, lm_head, hidden, input_ids, loss_mask


def reference_losses(heads, lm_head, hidden, input_ids, loss_mask, soft_weight):
    """Plain autograd, full logits: per head (1 - w) * token CE over predictable targets' rows +
    w * -sum_kept p log q with p = softmax(lm_head h_{t+k+1}) over the full vocabulary."""
    kept = heads.token_map if heads.token_map is not None else torch.arange(lm_head.shape[0])
    objectives, token_sums, soft_sums = [], [], []
    for k in range(heads.num_heads):
        labels = head_targets(input_ids, loss_mask, k)
        rows, positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
        logits = heads.transform(hidden[rows, positions], k) @ heads.projection_weight(k).T  # [N, kept]
        inverse = torch.full((lm_head.shape[0],), IGNORE_INDEX)
        inverse[kept] = torch.arange(len(kept))
        token = F.cross_entropy(logits, inverse[labels[rows, positions]], ignore_index=IGNORE_INDEX, reduction="sum")
        p = torch.softmax(hidden[rows, positions + k + 1] @ lm_head.T, -1)[:, kept]
        soft = -(p * torch.log_softmax(logits, -1)).sum()
        objectives.append((1 - soft_weight) * token + soft_weight * soft)
        token_sums.append(token)
        soft_sums.append(soft)
    return objectives, token_sums, soft_sums


@pytest.mark.parametrize("head_vocab", [None, 10])
@pytest.mark.parametrize("soft_weight", [0.5, 1.0])
def test_head_soft_loss_equals_plain_cross_entropy_with_the_base_distribution(head_vocab, soft_weight):
    heads, lm_head, hidden, input_ids, loss_mask = heads_and_batch(head_vocab)
    result = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=3, soft=SoftTargets(lm_head, soft_weight))
    sum(result.loss_sums).backward()
    ours = [p.grad.clone() for p in heads.parameters()]
    heads.zero_grad()
    objectives, token_sums, soft_sums = reference_losses(heads, lm_head, hidden, input_ids, loss_mask, soft_weight)
    sum(objectives).backward()
    for k in range(heads.num_heads):
        assert result.loss_sums[k].item() == pytest.approx(objectives[k].item(), rel=1e-5)
        assert result.token_loss_sums[k].item() == pytest.approx(token_sums[k].item(), rel=1e-5)
        assert result.soft_loss_sums[k].item() == pytest.approx(soft_sums[k].item(), rel=1e-5)
    for a, p in zip(ours, heads.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)


def test_token_loss_is_over_predictable_targets_and_the_outside_share_is_reported():
    # Head vocabulary {0, 3, 6, ..., 27}; head 0 at position t predicts token t+2.
    heads = MedusaHeads(16, 30, num_heads=1, num_layers=0, head_vocab_size=10)
    heads.token_map.copy_(torch.arange(0, 30, 3))
    torch.manual_seed(1)
    heads.init_from_base(torch.randn(30, 16))
    hidden = torch.randn(1, 6, 16)
    input_ids = torch.tensor([[1, 1, 3, 4, 6, 5]])  # targets of head 0: 3, 4, 6, 5; 4 and 5 are outside the map
    loss_mask = torch.ones(1, 6, dtype=torch.bool)
    result = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=2)
    assert result.counts.tolist() == [4] and result.predictable.tolist() == [2]
    logits = hidden[0, [0, 2]] @ heads.projection_weight(0).T  # the rows whose targets are 3 (id 1) and 6 (id 2)
    expected = F.cross_entropy(logits, torch.tensor([1, 2]), reduction="sum")
    assert result.token_loss_sums[0].item() == pytest.approx(expected.item(), rel=1e-5)

    class Source:  # what evaluate_heads reads: collate(indices) and hidden_states(batch)
        def collate(self, indices):
            return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": torch.ones_like(input_ids), "hidden": hidden}

        def hidden_states(self, batch):
            return batch["hidden"]

    from contextlib import nullcontext

    held_out = evaluate_heads(heads, Source(), [0], batch_size=1, device="cpu", autocast=nullcontext(), chunk_size=2)
    # Mean over the 2 predictable targets (not the 4 targets), and half the targets outside the map.
    assert held_out["loss"][0] == pytest.approx(expected.item() / 2, rel=1e-5)
    assert held_out["outside"] == [0.5] and held_out["num_tokens"] == [4.0]
    assert held_out["top1"][0] <= 0.5  # targets outside the map are misses


def test_a_cached_log_normaliser_gives_the_same_soft_loss():
    heads, lm_head, hidden, input_ids, loss_mask = heads_and_batch(10)
    computed = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=4, soft=SoftTargets(lm_head, 0.5))
    cached = torch.logsumexp(hidden @ lm_head.T, dim=-1)  # [B, T], as `medusaforge cache` stores it per token
    given = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=4, soft=SoftTargets(lm_head, 0.5, cached))
    for a, b in zip(given.loss_sums, computed.loss_sums):
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    wrong = medusa_head_losses(heads, hidden, input_ids, loss_mask, chunk_size=4, soft=SoftTargets(lm_head, 0.5, cached + 1.0))
    assert wrong.soft_loss_sums.sum() < 0.5 * computed.soft_loss_sums.sum()  # the cached values are really read


def test_the_cache_stores_the_base_argmax_and_log_normaliser(tmp_path, monkeypatch):
    from helpers import learnable_data, save_tiny_model
    from transformers import AutoModelForCausalLM

    from medusaforge.cli import main
    from medusaforge.training.hidden_cache import HiddenCache
    from medusaforge.training.sources import OfflineBatches

    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "mc"))
    model = save_tiny_model(tmp_path / "tiny")
    data = learnable_data(tmp_path / "d.jsonl", num_conversations=6)
    assert main(["cache", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "c"), "--max-length", "64",
                 "--cache-dtype", "fp32", "--dtype", "fp32", "--device", "cpu"]) == 0
    cache = HiddenCache(tmp_path / "c")
    lm_head = AutoModelForCausalLM.from_pretrained(model).lm_head.weight.detach()
    for i in range(len(cache)):
        logits = cache.hidden(i) @ lm_head.T
        assert torch.equal(cache._rows("base_argmax", i).long(), logits.argmax(-1))
        torch.testing.assert_close(cache._rows("log_normaliser", i), torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    batch = OfflineBatches(cache).collate([0, 3])
    assert batch["log_normaliser"].shape == batch["input_ids"].shape
