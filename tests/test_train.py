"""The training loop end to end on a tiny model folder, through the real CLI entry point."""

import json

import pytest
import torch
from helpers import learnable_data, save_tiny_model

from medusaforge.cli import main
from medusaforge.config import parse_config
from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.training.medusa1 import Medusa1Config
from medusaforge.training.common import batch_schedule, cosine_with_warmup, split_examples


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def test_loss_goes_down_and_head0_accuracy_goes_up(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    data = learnable_data(tmp_path / "data.jsonl")
    out = tmp_path / "run"
    argv = [
        "train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--num-heads", "3", "--batch-size", "8", "--epochs", "8", "--lr", "3e-3", "--warmup-ratio", "0.1",
        "--eval-fraction", "0.2", "--progress", "false", "--dtype", "fp32",
    ]
    assert main(argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["head_top1"][0] > first["head_top1"][0] + 0.3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["held_out"]["top1"][0] > 0.5
    assert len(summary["held_out"]["top1"]) == 3
    # Trained heads (ResBlocks and projections) were saved, and they load against the same base.
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    heads = load_heads(out / "heads", base=base)
    assert torch.count_nonzero(heads.heads[0].blocks[0].linear.weight) > 0
    assert not torch.equal(heads.heads[0].lm_head.weight, base.lm_head.weight)
    # A non-empty --out is refused without --overwrite/--resume, and nothing in it is touched.
    before = (out / "summary.json").read_text()
    assert main(argv) == 1
    assert (out / "summary.json").read_text() == before


def test_yaml_config_and_flags_map_onto_the_dataclass(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("num-heads: 5\nlr: 0.01\nhead_weights: [1, 0.5, 0.25, 0.1, 0.1]\ndata: x.jsonl\n")
    config = parse_config(Medusa1Config, ["--config", str(path), "--lr", "0.02"])
    assert config.num_heads == 5 and config.lr == 0.02 and config.head_weights == [1, 0.5, 0.25, 0.1, 0.1]
    path.write_text("num_heds: 5\n")
    with pytest.raises(ValueError, match="unknown option 'num_heds'"):
        parse_config(Medusa1Config, ["--config", str(path)])


def test_cosine_schedule_hand_worked():
    values = [cosine_with_warmup(step, total_steps=10, warmup_steps=2, min_lr_ratio=0.0) for step in range(11)]
    assert values[0] == pytest.approx(0.5) and values[1] == pytest.approx(1.0)
    assert values[2] == pytest.approx(1.0)  # start of the cosine
    assert values[6] == pytest.approx(0.5)  # half way through the 8 decay steps
    assert values[10] == pytest.approx(0.0)


def test_split_and_schedule_are_seeded_and_disjoint():
    train, held_out = split_examples(20, 0.25, seed=3)
    assert len(held_out) == 5 and not set(train) & set(held_out) and len(train) + len(held_out) == 20
    assert split_examples(20, 0.25, seed=3) == (train, held_out)
    batches = batch_schedule(train, 4, num_batches=9, seed=0)
    assert sorted(sum(batches[:4], [])) == train  # the first epoch visits every training example once
    assert batches == batch_schedule(train, 4, num_batches=9, seed=0)


def test_token_batches_time_budget_and_soft_targets_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=24)
    base_argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--num-heads", "2", "--head-vocab", "40",
                 "--batch-tokens", "128", "--max-length", "64", "--lr", "3e-3", "--eval-fraction", "0.2",
                 "--progress", "false", "--dtype", "fp32"]
    out = tmp_path / "soft"
    assert main(base_argv + ["--out", str(out), "--epochs", "2", "--soft-targets", "0.5", "--eval-every", "2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    metrics = [line for line in lines if "loss" in line]
    # --eval-every 2: a held-out line after every second step but the last, with the training seconds so far.
    interim = [line for line in lines if "held_out_top1" in line]
    assert [line["step"] for line in interim] == list(range(2, summary["steps"], 2))
    assert all(len(line["held_out_top1"]) == 2 for line in interim)
    assert [line["seconds"] for line in interim] == sorted(line["seconds"] for line in interim)
    assert summary["batch_tokens"] == 128 and summary["soft_targets"] == 0.5
    assert summary["steps"] == summary["planned_steps"] == len(metrics) > 2
    assert summary["peak_rss_bytes"] > 10 * 2**20
    assert all(len(m["head_soft_loss"]) == 2 and 0.0 <= m["head_outside"][0] < 1.0 for m in metrics)
    held_out = summary["held_out"]
    assert len(held_out["outside"]) == 2 and all(0.0 <= share < 1.0 for share in held_out["outside"])
    # A budget of 0.6 s: the first step (model warm-up included) uses it, so the run stops there,
    # with its LR decay fitted to that one step, and says how many it had planned.
    budgeted = tmp_path / "budgeted"
    assert main(base_argv + ["--out", str(budgeted), "--epochs", "500", "--max-minutes", "0.01"]) == 0
    summary = json.loads((budgeted / "summary.json").read_text())
    assert summary["steps"] < summary["planned_steps"] and summary["planned_steps"] >= 500
    assert len((budgeted / "metrics.jsonl").read_text().splitlines()) == summary["steps"]


def test_head_loss_in_metrics_is_over_predictable_targets_with_a_truncated_vocabulary(tmp_path, tiny_model_dir, monkeypatch):
    """With --head-vocab, metrics.jsonl's head_loss is the token loss averaged over the targets
    inside the head's token map only, and head_outside is the share of targets outside it. Both are
    recomputed by hand from the logits of the step's micro-batches, which a wrapper around the loss
    sees as the recipe runs it (the heads only change after the step's last micro-batch)."""
    from medusaforge.training import medusa1

    num_heads = 2
    loss_sums, inside, targets = (torch.zeros(num_heads, dtype=torch.float64) for _ in range(3))
    real_loss = medusa1.medusa_head_losses

    def recording_loss(heads, hidden, input_ids, loss_mask, chunk_size=512, **kwargs):
        with torch.no_grad():
            token_map = heads.token_map.tolist()
            for k in range(num_heads):
                offset = k + 2  # head k at position t predicts token t+k+2, where that token is a target
                logits = heads.transform(hidden[:, :-offset], k) @ heads.projection_weight(k).T  # [B, T - offset, head_vocab]
                for b, t in loss_mask[:, offset:].nonzero().tolist():
                    token = int(input_ids[b, t + offset])
                    targets[k] += 1
                    if token in token_map:
                        inside[k] += 1
                        row = logits[b, t].double()
                        loss_sums[k] += float(torch.logsumexp(row, -1) - row[token_map.index(token)])
        return real_loss(heads, hidden, input_ids, loss_mask, chunk_size, **kwargs)

    monkeypatch.setattr(medusa1, "medusa_head_losses", recording_loss)
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "cache"))
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=10)
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--num-heads", str(num_heads),
                 "--head-vocab", "6", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "1", "--eval-fraction", "0.2",
                 "--progress", "false", "--dtype", "fp32"]) == 0
    [line] = [json.loads(text) for text in (out / "metrics.jsonl").read_text().splitlines() if "head_loss" in text]
    outside = 1 - inside / targets
    # A 6-token map leaves a good share of targets outside it (else the two denominators would agree).
    assert (inside > 0).all() and (outside > 0.05).all(), (inside, targets)
    assert line["head_loss"] == pytest.approx((loss_sums / inside).tolist(), rel=1e-4)
    assert line["head_outside"] == pytest.approx(outside.tolist(), rel=1e-5)
