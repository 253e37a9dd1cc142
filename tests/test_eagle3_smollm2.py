"""EAGLE-3 training on the real SmolLM2-135M-Instruct, on a tiny budget: the default feature layers
are (2, 15, 27), two training steps run online, and the saved draft loads back against the base."""

import json

import pytest
import torch

from medusaforge.cli import main
from medusaforge.drafters.eagle3 import load_draft
from medusaforge.models import load_base_model
from tests.helpers import sharegpt, write_jsonl

pytestmark = pytest.mark.slow


def test_train_eagle3_on_smollm2(tmp_path):
    replies = ["The capital of France is Paris.", "Two plus two is four.", "I like green tea in the morning.",
               "Rain comes from clouds.", "A week has seven days.", "Cats sleep a lot."]
    data = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", f"Question {i}?"), ("gpt", r)) for i, r in enumerate(replies)])
    out = tmp_path / "run"
    assert main(["train", "--method", "eagle3", "--data", str(data), "--out", str(out), "--num-steps", "3",
                 "--draft-vocab", "512", "--vocab-examples", "4", "--batch-size", "3", "--max-steps", "2",
                 "--eval-fraction", "0.34", "--progress", "false"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["feature_layers"] == [2, 15, 27] and len(summary["held_out"]["top1"]) == 3
    base = load_base_model("smollm2-135m-instruct")
    draft = load_draft(out / "draft", base.get_input_embeddings())
    assert draft.fc.weight.shape == (576, 3 * 576) and draft.lm_head.weight.shape == (512, 576)
    assert int(draft.t2d.sum()) == 512 and torch.equal(draft.to_target(torch.arange(512)), draft.t2d.nonzero().flatten())
