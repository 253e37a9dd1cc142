"""benchmarks/distill_speed.py: both methods, any batch, give the same greedy replies on a tiny model."""

import argparse

import pytest
import torch

from medusaforge.data.self_requests import end_of_turn_ids
from medusaforge.models import load_base_model, load_tokenizer
from tests.helpers import import_benchmark, save_tiny_model

distill_speed = import_benchmark("distill_speed")


def test_generate_and_ours_at_any_batch_write_the_same_replies(tmp_path):
    folder = save_tiny_model(tmp_path / "model")
    tokenizer = load_tokenizer(str(folder))
    tokenizer.padding_side = "left"
    base = load_base_model(str(folder), dtype=torch.float32, device=torch.device("cpu"), check=False)
    chats = [[{"role": "user", "content": text}] for text in ("hello there", "the quick brown fox jumps", "a b c", "why")]
    rendered = [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in chats]
    stop = end_of_turn_ids(base, tokenizer)
    reference = distill_speed.run_arm(("generate", 4), base, tokenizer, rendered, stop, 8)
    assert all(1 <= len(reply) <= 8 for reply in reference)
    for arm in (("ours", 4), ("ours", 3), ("generate", 1)):
        assert distill_speed.run_arm(arm, base, tokenizer, rendered, stop, 8) == reference


@pytest.mark.parametrize("text", ["ours", "vllm:8", "ours:0", "ours:x"])
def test_a_bad_arm_is_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        distill_speed.parse_arm(text)
