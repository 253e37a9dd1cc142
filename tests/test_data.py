"""Chat data: record formats, the assistant-only loss mask, truncation, the tokenized cache, errors."""

import json

import pytest
import torch
from helpers import sharegpt, tiny_tokenizer, write_jsonl

from medusaforge.data.conversations import (
    Conversation,
    DataError,
    collate,
    load_tokenized,
    parse_record,
    read_conversations,
    tokenize_conversation,
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def masked_runs(ids, mask):
    runs, current = [], []
    for token, keep in zip(ids.tolist(), mask.tolist()):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


def test_all_record_forms_parse_to_the_same_messages():
    expected = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    forms = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"id": "x1", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    for record in forms:
        assert parse_record(record, "f:1").messages == expected


def test_mask_covers_exactly_the_assistant_text_and_end_of_turn(tokenizer):
    conversation = Conversation(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
            {"role": "user", "content": "How are you?"},
            {"role": "assistant", "content": "I am fine,\nthanks for asking!"},
        ],
        "t:1",
    )
    ids, mask = tokenize_conversation(tokenizer, conversation, max_length=512)
    decoded = [tokenizer.decode(run) for run in masked_runs(ids, mask)]
    assert decoded == ["The capital of France is Paris.<|im_end|>", "I am fine,\nthanks for asking!<|im_end|>"]


def test_system_and_user_tokens_are_never_in_the_loss(tokenizer):
    user_text = "Hello there quick brown fox"
    conversation = Conversation(
        [{"role": "user", "content": user_text}, {"role": "assistant", "content": "Paris."}], "t:1"
    )
    ids, mask = tokenize_conversation(tokenizer, conversation, max_length=512)
    masked_text = tokenizer.decode(ids[mask])
    unmasked_text = tokenizer.decode(ids[~mask])
    assert masked_text == "Paris.<|im_end|>"
    assert user_text in unmasked_text and "You are a tiny test model." in unmasked_text
    assert "<|im_start|>assistant\n" in unmasked_text  # the role header is template, not assistant text


def test_leading_space_in_reply_is_kept(tokenizer):
    conversation = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " Hello there"}], "t:1")
    ids, mask = tokenize_conversation(tokenizer, conversation, max_length=512)
    assert tokenizer.decode(ids[mask]).strip() == "Hello there<|im_end|>"


def test_truncation_keeps_the_prefix(tokenizer):
    conversation = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there " * 20}], "t:1")
    full_ids, full_mask = tokenize_conversation(tokenizer, conversation, max_length=10_000)
    ids, mask = tokenize_conversation(tokenizer, conversation, max_length=30)
    assert len(ids) == 30
    assert torch.equal(ids, full_ids[:30]) and torch.equal(mask, full_mask[:30])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [', "malformed JSON"),
        (json.dumps(sharegpt(("human", "hi"))), "no assistant turn"),
        (json.dumps(sharegpt(("human", "hi"), ("robot", "x"))), "unknown role 'robot'"),
        (json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}), "content must be a string"),
        (json.dumps({"messages": [{"role": "system", "content": "x"}]}), "only system turns"),
        (json.dumps({"messages": []}), "empty conversation"),
        (json.dumps([1, 2]), "expected a JSON object"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps(sharegpt(("human", "hi"), ("gpt", "hello")))
    path = write_jsonl(tmp_path / "data.jsonl", [good, good, line])
    with pytest.raises(DataError) as error:
        read_conversations(path)
    assert f"{path}:3" in str(error.value) and message in str(error.value)
    conversations, errors = read_conversations(path, skip_invalid=True)
    assert len(conversations) == 2 and len(errors) == 1 and f"{path}:3" in errors[0]


def test_non_utf8_bytes_are_reported_with_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(sharegpt(("human", "hi"), ("gpt", "yo"))).encode() + b"\n\xff\xfe\n")
    with pytest.raises(DataError, match=f"{path}:2: not valid UTF-8"):
        read_conversations(path)


def test_tokenized_cache_is_reused_and_keyed_by_max_length(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "data.jsonl", [sharegpt(("human", "hi"), ("gpt", "Hello there " * 5))] * 3)
    logs = []
    first = load_tokenized(path, tokenizer, 64, cache_dir=tmp_path / "cache", log=logs.append)
    second = load_tokenized(path, tokenizer, 64, cache_dir=tmp_path / "cache", log=logs.append)
    assert any("reusing cache" in line for line in logs)
    assert torch.equal(first.input_ids, second.input_ids) and torch.equal(first.loss_mask, second.loss_mask)
    limit = int(first.lengths.max()) - 5
    shorter = load_tokenized(path, tokenizer, limit, cache_dir=tmp_path / "cache", log=logs.append)
    assert shorter.lengths.max() == limit
    assert sum("reusing cache" in line for line in logs) == 1


def test_collate_pads_and_masks(tokenizer):
    a = (torch.tensor([5, 6, 7]), torch.tensor([False, True, True]))
    b = (torch.tensor([8]), torch.tensor([True]))
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True], [True, False, False]]
