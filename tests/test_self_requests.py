"""The `self` prompt source: requests the base model writes when given only the start of a user turn."""

from types import SimpleNamespace

import pytest
import torch

from medusaforge.cli import main
from medusaforge.commands import distill
from medusaforge.commands.distill import DistillConfig, builtin_prompts, select_prompts, self_request_count
from medusaforge.data.self_requests import finished_text, request_prefix, self_requests

from helpers import save_tiny_model, tiny_llama, tiny_tokenizer


def contents(chats):
    return [chat[0]["content"] for chat in chats]


def test_request_prefix_is_the_template_up_to_the_user_message():
    tokenizer = tiny_tokenizer()
    assert request_prefix(tokenizer) == "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n"


def test_a_template_that_rewrites_the_message_is_refused():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    with pytest.raises(ValueError, match="verbatim"):
        request_prefix(tokenizer)


def test_finished_text_cuts_at_the_first_end_of_turn_and_drops_unfinished_turns():
    tokenizer = tiny_tokenizer()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    words = tokenizer("What is the capital of France?", add_special_tokens=False)["input_ids"]
    assert finished_text(words + [end] + words, {end}, tokenizer) == "What is the capital of France?"
    assert finished_text(words, {end}, tokenizer) is None


class ScriptedBase:
    """Returns fixed continuations batch after batch, to check which requests are kept."""

    def __init__(self, tokenizer, batches: list[list[str]]):
        self.device = torch.device("cpu")
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.generation_config = SimpleNamespace(eos_token_id=self.end)
        self.tokenizer, self.batches, self.rows_asked = tokenizer, iter(batches), []

    def generate(self, input_ids, **kwargs):
        texts = next(self.batches)
        self.rows_asked.append(input_ids.shape[0])
        rows = []
        for text in texts:
            # a trailing "..." stands for a request that ran out of tokens before its turn ended
            ids = self.tokenizer(text.removesuffix("..."), add_special_tokens=False)["input_ids"]
            rows.append(ids + ([] if text.endswith("...") else [self.end]))
        width = max(map(len, rows))
        padded = [row + [self.end] * (width - len(row)) if not text.endswith("...") else row + [0] * (width - len(row))
                  for row, text in zip(rows, texts)]
        return torch.cat([input_ids[: len(texts)], torch.tensor(padded)], dim=1)


def test_self_requests_keeps_finished_distinct_long_enough_requests_up_to_the_count():
    tokenizer = tiny_tokenizer()
    base = ScriptedBase(tokenizer, [
        ["What is the capital of France?", "Hi", "The quick brown fox...", "what is the capital of france?"],
        ["Tell me about the lazy dog.", "What is the capital of France?", "A tiny test model.", "One more."],
    ])
    chats = self_requests(base, tokenizer, 3, batch_size=4, min_chars=8)
    assert [chat[0]["content"] for chat in chats] == [
        "What is the capital of France?", "Tell me about the lazy dog.", "A tiny test model."]
    assert all(chat[0]["role"] == "user" and len(chat) == 1 for chat in chats)
    assert base.rows_asked == [4, 4]


def test_self_requests_gives_up_after_four_draws_per_wanted_request():
    tokenizer = tiny_tokenizer()
    base = ScriptedBase(tokenizer, [["Hi", "Hi", "Hi"], ["Hi", "Hi", "Hi"], ["Hi", "Hi"]])
    assert self_requests(base, tokenizer, 2, batch_size=3) == []
    assert base.rows_asked == [3, 3, 2]  # 8 draws for 2 wanted


def test_self_requests_on_a_real_model_leaves_the_global_generator_alone():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    chats = self_requests(model, tokenizer, 2, max_new_tokens=6, batch_size=4, min_chars=1, seed=5)
    assert torch.equal(torch.rand(3), expected)
    assert len(chats) <= 2 and len({chat[0]["content"].lower() for chat in chats}) == len(chats)
    again = self_requests(model, tokenizer, 2, max_new_tokens=6, batch_size=4, min_chars=1, seed=5)
    assert again == chats  # the seed alone fixes what is sampled


def self_written(count):
    return [[{"role": "user", "content": f"self-written request {i}"}] for i in range(count)]


def test_the_self_source_takes_its_turn_with_the_others_and_needs_a_count():
    config = DistillConfig(prompts="self+instructions", num_prompts=4, skip_prompts=2)
    assert self_request_count(config) == 3  # its share of the first 6 prompts, ceil(6 / 2)
    chosen = contents(select_prompts(config, self_written(3)))
    assert chosen[0::2] == ["self-written request 1", "self-written request 2"]  # 0 went to the skipped two
    assert not any(text.startswith("self-written") for text in chosen[1::2])
    assert self_request_count(DistillConfig(prompts="instructions", num_prompts=4)) == 0
    with pytest.raises(ValueError, match="--num-prompts"):
        self_request_count(DistillConfig(prompts="self", num_prompts=0))
    with pytest.raises(ValueError, match="written by the base model"):
        builtin_prompts("self", min_chars=8, seed=0)


def test_distill_through_an_endpoint_refuses_the_self_source(tmp_path, capsys):
    assert main(["distill", "--prompts", "self", "--num-prompts", "4", "--endpoint", "http://localhost:1/v1",
                 "--out", str(tmp_path / "x.jsonl")]) != 0
    assert "not by --endpoint" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_writing_the_requests_counts_toward_the_time_limit(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model")
    ticks = iter(range(0, 10_000, 100))  # every clock read is 100 s later
    monkeypatch.setattr(distill, "perf_counter", lambda: next(ticks))
    asked = {}

    def write_requests(base, tokenizer, count, **options):
        asked.update(options, count=count)
        return self_written(count)

    monkeypatch.setattr(distill, "self_requests", write_requests)
    out = tmp_path / "distill.jsonl"
    # The requests start at 0 and end at 100: 100 of the 150 s are spent, so replies get 50 s and
    # no batch starts (the first would start 100 s into them).
    main(["distill", "--model", str(model), "--prompts", "self", "--num-prompts", "3", "--max-new-tokens", "2",
          "--max-minutes", str(150 / 60), "--out", str(out), "--progress", "false"])
    assert asked["count"] == 3 and asked["max_seconds"] == pytest.approx(150)
    assert out.read_text() == ""
