"""The main job end to end on the real SmolLM2-135M-Instruct, on a tiny budget:
distill a few chitchat replies, train heads for a few steps, load them back against the base."""

import json

import pytest
import torch

from medusaforge.cli import main
from medusaforge.data.conversations import load_tokenized
from medusaforge.drafters.medusa_heads import load_heads
from medusaforge.models import load_base_model, load_tokenizer

pytestmark = pytest.mark.slow


def test_distill_then_train_on_the_embedded_model(tmp_path):
    distilled = tmp_path / "distill.jsonl"
    assert main([
        "distill", "--num-prompts", "6", "--max-new-tokens", "24", "--batch-size", "6",
        "--out", str(distilled), "--progress", "false",
    ]) == 0
    records = [json.loads(line) for line in distilled.read_text().splitlines()]
    assert len(records) == 6
    assert all(r["conversations"][0]["from"] == "human" and r["conversations"][-1]["from"] == "gpt" for r in records)

    # The loss mask on real data covers exactly what the model wrote (plus its end-of-turn token).
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    data = load_tokenized(distilled, tokenizer, 512, cache_dir=tmp_path / "tok")
    for index, record in enumerate(records):
        ids, mask = data.example(index)
        assert tokenizer.decode(ids[mask]) == record["conversations"][-1]["value"] + "<|im_end|>"

    out = tmp_path / "run"
    assert main([
        "train", "--data", str(distilled), "--out", str(out), "--num-heads", "3", "--batch-size", "3",
        "--max-steps", "2", "--eval-fraction", "0.34", "--progress", "false",
    ]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and summary["steps"] == 2
    assert len(summary["held_out"]["top1"]) == 3 and all(n > 0 for n in summary["held_out"]["num_tokens"])
    heads = load_heads(out / "heads", base=load_base_model("smollm2-135m-instruct"))
    assert heads.num_heads == 3 and heads.config.hidden_size == 576 and heads.config.vocab_size == 49152
    # Every head trained: its ResBlock starts at zero and has moved.
    assert all(torch.count_nonzero(head.blocks[0].linear.weight) > 0 for head in heads.heads)
