"""The chitchat-dataset conversations (PyPI `chitchat-dataset`: 7,168 real chats between two people).

Three readers: `distill` prompts with their first messages, the copy-heavy prompt set pastes whole
conversations and long messages, and `human_chats` turns them into training conversations whose
assistant side a person wrote (the human side of the data-mix study, benchmarks/data_mix.py).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path


def chitchat_conversations() -> list[list[list[str]]]:
    """Every conversation (sorted by id) as its turns, each turn one speaker's messages; speakers alternate, A opens."""
    spec = importlib.util.find_spec("chitchat_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("chitchat conversations need the PyPI package chitchat-dataset: pip install chitchat-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset.json"
    data = json.loads(path.read_text())
    return [[[u["text"] for u in turn] for turn in data[key]["messages"]] for key in sorted(data)]


def turn_texts(conversation: list[list[str]]) -> list[str]:
    """One string per turn: the speaker's messages joined by spaces."""
    return [" ".join(turn).strip() for turn in conversation]


def human_chats(limit: int, seed: int) -> list[list[dict]]:
    """Up to `limit` conversations (0: all) as chat messages, shuffled with `seed`: speaker A is the
    user, B the assistant. Conversations without a reply are left out, and so are empty turns."""
    chats = []
    for conversation in chitchat_conversations():
        turns = turn_texts(conversation)
        if len(turns) < 2 or not all(turns):
            continue
        chats.append([{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)])
    random.Random(seed).shuffle(chats)
    return chats[:limit] if limit else chats
