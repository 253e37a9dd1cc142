"""The offline recipes on the real SmolLM2-135M-Instruct, on a tiny budget: one cache pass stores the
final states, the EAGLE-3 features and the base's argmax/logsumexp; from it the heads train with soft
targets and token batches, and the EAGLE-3 draft trains under a time budget. Checks the wiring at
real sizes (49,152-token vocabulary, bf16 where the host runs it), not quality."""

import json

import pytest
import torch

from medusaforge.cli import main
from medusaforge.training.hidden_cache import HiddenCache
from tests.helpers import sharegpt, write_jsonl

pytestmark = pytest.mark.slow


def test_one_cache_pass_feeds_soft_target_heads_and_a_time_budgeted_eagle3_draft(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "mc"))
    replies = ["The capital of France is Paris.", "Two plus two is four.", "I like green tea in the morning.",
               "Rain comes from clouds.", "A week has seven days.", "Cats sleep a lot."]
    data = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", f"Question {i}?"), ("gpt", r)) for i, r in enumerate(replies)])
    cache = tmp_path / "cache"
    assert main(["cache", "--data", str(data), "--out", str(cache), "--max-length", "128", "--eagle3-features"]) == 0
    opened = HiddenCache(cache)
    assert opened.feature_layers == (2, 15, 27) and opened.has("base_argmax") and opened.has("log_normaliser")

    heads = tmp_path / "heads"
    assert main(["train", "--cache", str(cache), "--out", str(heads), "--num-heads", "2", "--head-vocab", "1024",
                 "--soft-targets", "0.5", "--batch-tokens", "256", "--max-length", "128", "--max-steps", "2",
                 "--eval-fraction", "0.34", "--progress", "false"]) == 0
    summary = json.loads((heads / "summary.json").read_text())
    metrics = [json.loads(line) for line in (heads / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 2 and all(torch.isfinite(torch.tensor(m["head_soft_loss"])).all() for m in metrics)
    assert len(summary["held_out"]["outside"]) == 2 and summary["peak_rss_bytes"] > 0

    draft = tmp_path / "eagle3"
    assert main(["train", "--method", "eagle3", "--cache", str(cache), "--out", str(draft), "--num-steps", "3",
                 "--draft-vocab", "512", "--vocab-examples", "4", "--batch-tokens", "256", "--max-length", "128",
                 "--epochs", "1000", "--max-minutes", "0.2", "--eval-fraction", "0.34", "--progress", "false"]) == 0
    summary = json.loads((draft / "summary.json").read_text())
    assert 1 <= summary["steps"] < summary["planned_steps"] and summary["train_seconds"] < 30
    assert len(summary["held_out"]["top1"]) == 3 and summary["peak_rss_bytes"] > 0
