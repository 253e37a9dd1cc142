"""`medusaforge distill` on a tiny model: batch order, and the time limit that keeps a first run short."""

import json

import pytest

from medusaforge.cli import main
from medusaforge.commands import distill
from medusaforge.commands.distill import drop_long_prompts, generation_batches

from helpers import save_tiny_model, tiny_tokenizer, write_jsonl


def test_generation_batches_sort_by_length_within_each_round_only():
    lengths = [5, 1, 4, 2, 3, 9, 8]
    # rounds of 2 batches of 2: prompts 0-3, then 4-6, each sorted by length
    assert generation_batches(lengths, batch_size=2, batches_per_round=2) == [[1, 3], [2, 0], [4, 6], [5]]
    assert sorted(i for batch in generation_batches(lengths, 3) for i in batch) == list(range(7))


def test_max_minutes_stops_before_a_batch_that_would_end_past_it(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"question number {i} here"}]} for i in range(6)])
    ticks = iter(range(0, 10_000, 100))  # every clock read is 100 s later: each batch takes 100 s
    monkeypatch.setattr(distill, "perf_counter", lambda: next(ticks))
    out = tmp_path / "distill.jsonl"
    # Clock reads: run starts at 0, generation at 100; batch 1 starts at 200 and ends at 300 (100 s);
    # batch 2 would start 300 s into generation and likely end at 400, past 350, so it does not start.
    assert main(["distill", "--model", str(model), "--prompts", str(prompts), "--num-prompts", "0", "--batch-size", "2",
                 "--max-new-tokens", "4", "--max-minutes", str(350 / 60), "--out", str(out), "--progress", "false"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= len(records) <= 2  # one batch of two prompts (an empty reply is not written)


def test_a_negative_time_limit_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--max-minutes", "-1", "--out", str(tmp_path / "x.jsonl")])
    assert "--max-minutes" in capsys.readouterr().err


def test_prompts_longer_than_the_limit_are_skipped_and_counted(capsys):
    tokenizer = tiny_tokenizer()
    short, long = [{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "the lazy dog " * 40}]
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in (short, long)]
    short_length, long_length = (len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered)
    assert short_length < long_length
    assert drop_long_prompts([short, long, short], tokenizer, short_length) == [short, short]
    assert f"skipped 1 of 3 prompts longer than --max-prompt-tokens {short_length} (longest {long_length} tokens)" in capsys.readouterr().out
    assert drop_long_prompts([short, long], tokenizer, long_length) == [short, long]
    assert drop_long_prompts([short, long], tokenizer, 0) == [short, long]  # no limit


def test_a_prompt_length_limit_is_refused_with_an_endpoint(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--max-prompt-tokens", "100", "--endpoint", "http://localhost:1/v1", "--out", str(tmp_path / "x.jsonl")])
    assert "--max-prompt-tokens" in capsys.readouterr().err
