"""benchmarks/draft_top1.py: a draft scored on a cache of exactly its training run's held-out
conversations gives that run's own held-out top-1."""

from __future__ import annotations

import json

import pytest

from medusaforge.cli import main
from medusaforge.training import eagle3 as recipe
from medusaforge.training.common import split_examples
from tests.helpers import import_benchmark, learnable_data, save_tiny_model, write_jsonl

draft_top1 = import_benchmark("draft_top1")


def cache_of(model, data, out):
    assert main(["cache", "--model", str(model), "--data", str(data), "--out", str(out), "--max-length", "64", "--eagle3-features",
                 "--feature-layers", "0", "1", "2", "--cache-dtype", "fp32", "--dtype", "fp32", "--device", "cpu"]) == 0
    return out


def test_scores_on_a_held_out_cache_equal_the_training_runs_held_out_figure(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "model-cache"))
    model = save_tiny_model(tmp_path / "model")
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=20)
    config = recipe.Eagle3Config(model=str(model), cache=cache_of(model, data, tmp_path / "hidden"), out=tmp_path / "run", num_steps=3,
                                 draft_vocab=128, vocab_examples=8, max_length=64, batch_size=4, max_steps=6, lr=3e-3,
                                 eval_fraction=0.25, device="cpu", dtype="fp32", progress=False)
    recipe.train(config)
    held_out = json.loads((tmp_path / "run" / "summary.json").read_text())["held_out"]["top1"]

    records = [json.loads(line) for line in data.read_text().splitlines()]
    _, eval_indices = split_examples(len(records), 0.25, config.seed)
    held_data = write_jsonl(tmp_path / "held.jsonl", [records[i] for i in sorted(eval_indices)])
    rows = draft_top1.score(str(model), cache_of(model, held_data, tmp_path / "held"), [("run", tmp_path / "run")], [], dtype="fp32")

    assert [label for label, _ in rows] == ["EAGLE-3 run"]
    assert rows[0][1] == pytest.approx(held_out, abs=1e-6)
    assert max(held_out) > 0  # a figure that could have differed
