"""The file `distill` writes: one ShareGPT record per prompt, keyed by the prompt itself.

Both ways of distilling (generation in this process, and a serving engine's endpoint) write the
same record, built here:

  {"conversations": [{"from": "system"|"human", "value": ...}, ..., {"from": "gpt", "value": reply}],
   "finished": true when the reply ended at end-of-turn}

A record carries its prompt, so the prompt is its key and the file needs no extra field: a rerun
reads the file back, keys each record by its prompt, and asks only for the prompts not there yet.
The key is a hash of the prompt's messages and their occurrence number, so a prompt listed twice
is asked twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from medusaforge.files import atomic_file

ROLE_TO_SHAREGPT = {"user": "human", "assistant": "gpt"}
SHAREGPT_TO_ROLE = {"human": "user", "gpt": "assistant"}


def distilled_record(prompt: list[dict], reply: str, finished: bool) -> dict:
    """Prompt messages ([{"role", "content"}]) and the reply -> the record `distill` writes."""
    turns = [{"from": ROLE_TO_SHAREGPT.get(m["role"], m["role"]), "value": m["content"]} for m in prompt]
    turns.append({"from": "gpt", "value": reply})
    return {"conversations": turns, "finished": finished}


def prompt_of(record: dict) -> list[dict]:
    """A written record -> the prompt messages it was asked with (every turn but the reply)."""
    return [{"role": SHAREGPT_TO_ROLE.get(t["from"], t["from"]), "content": t["value"]} for t in record["conversations"][:-1]]


def _digest(prompt: list[dict]) -> str:
    text = json.dumps([[m["role"], m["content"]] for m in prompt], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def prompt_keys(prompts: list[list[dict]]) -> list[str]:
    """One stable key per prompt: its hash and how many equal prompts came before it ("abc#0", "abc#1")."""
    seen: Counter = Counter()
    keys = []
    for prompt in prompts:
        digest = _digest(prompt)
        keys.append(f"{digest}#{seen[digest]}")
        seen[digest] += 1
    return keys


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that a killed run left half-written (no closing newline). Returns the bytes cut.
    Every finished reply ends with a newline and an fsync, so only an unfinished write lacks one."""
    with open(path, "rb+") as handle:
        data = handle.read()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
        return len(data) - keep


def read_distilled(path: Path) -> list[dict]:
    """The records of a distill file; a bad line is an error naming the file and line (never skipped:
    resuming over a damaged file would silently ask its prompts again)."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompt_of(record)
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as error:
                raise ValueError(f"{path}:{line_number}: not a distill record ({error})") from None
            records.append(record)
    return records


def done_keys(records: list[dict]) -> list[str]:
    """The keys of the records already written, in file order (see prompt_keys)."""
    return prompt_keys([prompt_of(record) for record in records])


def sort_into_prompt_order(path: Path, keys: list[str]) -> None:
    """Rewrite the file (atomically) with records in prompt order. Replies arrive in completion order;
    prompt order makes the file, and so the seeded held-out split of training, the same on every run.
    Records of prompts not in `keys` stay, after the others, in their order."""
    records = read_distilled(path)
    position = {key: index for index, key in enumerate(keys)}
    record_keys = done_keys(records)
    order = sorted(range(len(records)), key=lambda i: (position.get(record_keys[i], len(keys)), i))
    with atomic_file(path) as handle:
        for index in order:
            handle.write(json.dumps(records[index]) + "\n")
