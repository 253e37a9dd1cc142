"""The tokenized-data cache: keyed by everything that produces the data, and its messages repeated on a hit."""

import json

import pytest
from helpers import sharegpt, tiny_tokenizer, write_jsonl

import medusaforge.data.conversations as conversations
from medusaforge.data.conversations import code_fingerprint, data_cache_key, load_tokenized


@pytest.fixture()
def tokenizer():
    return tiny_tokenizer()


def load(path, tokenizer, cache_dir, max_length=64, skip_invalid=False) -> list[str]:
    logs = []
    load_tokenized(path, tokenizer, max_length, skip_invalid=skip_invalid, cache_dir=cache_dir, log=logs.append)
    return logs


def reused(logs: list[str]) -> bool:
    return any("reusing cache" in line for line in logs)


def test_every_input_of_the_key_changes_it(tokenizer):
    data = b'{"conversations": []}\n'
    key = data_cache_key(data, tokenizer, 64, False)
    assert data_cache_key(data, tokenizer, 64, False) == key  # deterministic
    assert data_cache_key(data + b"\n", tokenizer, 64, False) != key
    assert data_cache_key(data, tokenizer, 65, False) != key
    assert data_cache_key(data, tokenizer, 64, True) != key
    other_template = tiny_tokenizer()
    other_template.chat_template = tokenizer.chat_template.replace("tiny test model", "small test model")
    assert data_cache_key(data, other_template, 64, False) != key


def test_the_code_fingerprint_follows_the_module_source(tmp_path, monkeypatch):
    # An edit to the masking code, as a developer would make it: one changed line in the source.
    source = open(conversations.__file__).read()
    edited = tmp_path / "conversations.py"
    edited.write_text(source.replace("loss_mask[token_index] = True\n", "loss_mask[token_index] = False\n", 1))
    assert edited.read_text() != source
    before = code_fingerprint()
    monkeypatch.setattr(conversations, "__file__", str(edited))
    assert code_fingerprint() != before


def test_a_stale_entry_is_not_reused_after_the_code_changes(tmp_path, tokenizer, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", "hi"), ("gpt", "Hello there"))] * 2)
    cache = tmp_path / "cache"
    assert not reused(load(path, tokenizer, cache))
    assert reused(load(path, tokenizer, cache))
    edited = tmp_path / "conversations.py"
    edited.write_text(open(conversations.__file__).read() + "\n# a change to how data is made\n")
    monkeypatch.setattr(conversations, "__file__", str(edited))
    assert not reused(load(path, tokenizer, cache))  # tokenized anew, under a new key
    assert len(list(cache.glob("*.safetensors"))) == 2
    assert reused(load(path, tokenizer, cache))


def test_a_stale_entry_is_not_reused_after_the_tokenizer_changes(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", "hi"), ("gpt", "Hello there"))] * 2)
    cache = tmp_path / "cache"
    load(path, tokenizer, cache)
    tokenizer.chat_template = tokenizer.chat_template.replace("tiny test model", "small test model")
    assert not reused(load(path, tokenizer, cache))


def test_messages_repeat_on_a_cache_hit(tmp_path, tokenizer):
    long_prompt = "word " * 200  # the assistant turn starts beyond max_length: this conversation is dropped
    path = write_jsonl(tmp_path / "data.jsonl", [
        sharegpt(("human", "hi"), ("gpt", "Hello there")),
        sharegpt(("human", long_prompt), ("gpt", "Hello")),
        "{not json",
    ])
    cache = tmp_path / "cache"
    first = load(path, tokenizer, cache, skip_invalid=True)
    second = load(path, tokenizer, cache, skip_invalid=True)
    assert not reused(first) and reused(second)
    said = [line for line in first if "dropped 1 conversations" in line or line.startswith("skipped: ")]
    assert len(said) == 2 and f"{path}:2" in said[0] and f"{path}:3" in said[1]
    assert [line for line in second if not line.startswith("tokenized data: reusing")] == said
    side = json.loads(next(cache.glob("*.json")).read_text())
    assert side["messages"] == said and side["num_invalid"] == 1
