"""Built-in distill prompt sources: synthetic instructions and the chitchat+instructions mix."""

import pytest

from medusaforge.commands.distill import builtin_prompts, is_builtin
from medusaforge.data.instructions import TEMPLATES, instruction_prompts


def contents(chats):
    return [chat[0]["content"] for chat in chats]


def test_instruction_prompts_are_distinct_single_user_turns_and_seeded():
    first = instruction_prompts(seed=0, chat_messages=["a long real message " * 5])
    assert len(first) > 1000
    assert all(len(chat) == 1 and chat[0]["role"] == "user" and chat[0]["content"] for chat in first)
    assert len(set(contents(first))) == len(first)
    assert not any("{" in text for text in contents(first))  # every template slot was filled
    assert contents(instruction_prompts(seed=0, chat_messages=["a long real message " * 5])) == contents(first)
    assert contents(instruction_prompts(seed=1)) != contents(first)


def test_any_prefix_mixes_every_kind():
    prefix = contents(instruction_prompts(seed=0, chat_messages=["a long real message " * 5])[:16])
    assert any("function" in text for text in prefix)  # coding
    assert any("Pretend you are" in text for text in prefix)  # role-play
    assert any('"a long real message' in text for text in prefix)  # summaries of real messages
    assert len(TEMPLATES) + 3 <= 16


def test_chitchat_plus_instructions_alternates_and_quotes_other_openers():
    mixed = builtin_prompts("chitchat+instructions", min_chars=8, seed=0)
    chitchat = contents(builtin_prompts("chitchat", min_chars=8, seed=0))
    texts = contents(mixed)
    assert texts[0::2][:100] == chitchat[:100]
    assert not set(texts[1::2][:100]) & set(chitchat)
    # Quoted messages come from the far end of the shuffled openers, never from the first half used as prompts.
    first_half = chitchat[: len(chitchat) // 2]
    quoted = [t.split('"')[1] for t in texts[1::2] if t.count('"') >= 2]
    assert quoted and not set(quoted) & set(first_half)


def test_unknown_builtin_source_is_a_clear_error():
    assert is_builtin("chitchat+instructions") and not is_builtin("data.jsonl")
    with pytest.raises(ValueError, match="unknown built-in prompt source"):
        builtin_prompts("chitchat+nothing", min_chars=8, seed=0)
