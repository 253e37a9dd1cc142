"""The built-in copy-heavy prompt set: size, determinism, and every prompt carries its text."""

import collections
import hashlib
import json

import pytest

from medusaforge.data.copy_prompts import copy_heavy_prompts
from medusaforge.data.prompts import load_prompts, mt_bench_path


@pytest.fixture(scope="module")
def prompts():
    return copy_heavy_prompts(mt_bench_path())


def test_at_least_40_distinct_prompts_of_every_kind(prompts):
    assert len(prompts) >= 40
    kinds = collections.Counter(p.kind for p in prompts)
    assert kinds == {"mt-bench": 13, "chitchat-extract": 12, "chitchat-rewrite": 10, "chitchat-question": 10}
    assert len({p.messages[0]["content"] for p in prompts}) == len(prompts)
    # Kinds in turn, so a short prefix (--limit 8) already mixes all four.
    assert len({p.kind for p in prompts[:4]}) == 4 and len({p.kind for p in prompts[4:8]}) == 4


def test_every_prompt_carries_the_text_its_answer_copies_from(prompts):
    for prompt in prompts:
        content = prompt.messages[-1]["content"]
        assert prompt.messages[-1]["role"] == "user"
        assert len(prompt.source_text) >= 100, prompt
        assert content.endswith(prompt.source_text)
        assert content.startswith(prompt.request)
    # The MT-Bench part is its extraction category plus the three questions that paste a text.
    mt_bench = [p for p in prompts if p.kind == "mt-bench"]
    assert any(p.request.startswith("Edit the following paragraph") for p in mt_bench)
    assert any("def " in p.source_text for p in mt_bench)


# Written down by hand from one run: the set is built from installed data with a fixed seed, so these
# change only when the set does (then check the new prompts and update them here on purpose).
FIRST_PROMPTS = [
    "Edit the following paragraph to correct any grammatical errors:\n\nShe didn't remembre where is her purse",
    "Summarize the conversation below in three sentences, quoting the most important message of each speaker."
    "\n\nA: Hey! How is it going? I think Beethoven",
    "Rewrite the following paragraph with correct spelling, grammar and punctuation, keeping its wording as far as"
    " possible.\n\nok cool thanks! also I think",
    "Read the conversation below. What does speaker B say about their own plans or activities? Quote the lines that"
    " tell you.\n\nA: It would be cool to travel",
]
SET_SHA256 = "2883addd4f6478c084fb3c764d140a407c11d94d56a3b40451680e336981fa43"  # of json.dumps(the 45 chats)


def test_the_set_is_the_same_every_time_and_is_the_built_in_source():
    chats = load_prompts("copy-heavy")
    assert len(chats) == 45
    for chat, expected in zip(chats, FIRST_PROMPTS):
        assert len(chat) == 1 and chat[0]["role"] == "user" and chat[0]["content"].startswith(expected), chat
    assert hashlib.sha256(json.dumps(chats).encode()).hexdigest() == SET_SHA256
    assert load_prompts("copy-heavy", limit=3) == chats[:3]
