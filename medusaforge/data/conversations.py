"""Chat data: read JSONL conversations, render them with the chat template, mark assistant tokens.

Accepted records (one JSON object per line):
  ShareGPT   {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}
             (also with "role"/"content" keys, which is SpecForge's {"id", "conversations"} form)
  OpenAI     {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}

The loss mask is True exactly on the tokens the assistant wrote: each assistant turn's content and
its end-of-turn token, never the template's role headers or any system/user text. Tokenized data
is cached under `cache_root()/tokenized`, keyed by everything that produces it (`data_cache_key`),
so a second run skips the work and a change to any input is never served stale data.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medusaforge.files import atomic_write_text, commit_file, temporary_path_beside

ROLE_NAMES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


class DataError(ValueError):
    """A bad record; the message names the file and line."""


@dataclass
class Conversation:
    messages: list[dict]  # [{"role": "system"|"user"|"assistant", "content": str}]
    source: str  # "file:line", for error messages


def parse_record(record: object, where: str, require_assistant: bool = True) -> Conversation:
    """One decoded JSON value -> Conversation, or DataError naming `where`."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    turns = record.get("conversations", record.get("messages"))
    if turns is None:
        raise DataError(f"{where}: no 'conversations' or 'messages' list")
    if not isinstance(turns, list):
        raise DataError(f"{where}: 'conversations'/'messages' must be a list, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turn {index} must be an object, got {type(turn).__name__}")
        role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or role.lower() not in ROLE_NAMES:
            raise DataError(f"{where}: turn {index} has unknown role {role!r} (expected one of {sorted(ROLE_NAMES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {index} content must be a string, got {type(content).__name__}")
        messages.append({"role": ROLE_NAMES[role.lower()], "content": content})
    if not messages:
        raise DataError(f"{where}: empty conversation")
    first_non_system = next((m for m in messages if m["role"] != "system"), None)
    if first_non_system is None:
        raise DataError(f"{where}: only system turns")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn")
    if first_non_system["role"] != "user":
        raise DataError(f"{where}: the first non-system turn must be a user turn")
    return Conversation(messages, where)


def read_conversations(
    path: str | os.PathLike, skip_invalid: bool = False, require_assistant: bool = True
) -> tuple[list[Conversation], list[str]]:
    """Read a JSONL file. Returns (conversations, errors); errors is non-empty only with skip_invalid."""
    path = Path(path)
    conversations, errors = [], []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            try:
                text = raw.decode("utf-8")
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as error:
                    raise DataError(f"{where}: malformed JSON at column {error.colno} ({error.msg.removesuffix(' at')})") from None
                conversations.append(parse_record(record, where, require_assistant))
            except UnicodeDecodeError as error:
                problem = DataError(f"{where}: not valid UTF-8 (byte {error.start})")
                if not skip_invalid:
                    raise problem from None
                errors.append(str(problem))
            except DataError as problem:
                if not skip_invalid:
                    raise
                errors.append(str(problem))
    if not conversations:
        raise DataError(f"{path}: no usable conversations" + (f" ({len(errors)} invalid)" if errors else ""))
    return conversations, errors


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, conversation: Conversation, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Render with the chat template -> (input_ids [T] int64, loss_mask [T] bool), truncated to max_length.

    An assistant turn's span starts where the template's generation prompt ends and covers the
    content; the first special token after the content (the end-of-turn token, e.g. <|im_end|>)
    is included, because the model must learn to stop. Whitespace the template puts after it is not.
    """
    messages = conversation.messages
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{conversation.source}: the tokenizer has no chat template")
    full_text = _render(tokenizer, messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = _render(tokenizer, messages[:index], add_generation_prompt=True)
        if not full_text.startswith(prompt_text):
            raise DataError(
                f"{conversation.source}: the chat template does not render a conversation's prefix as a prefix "
                "of the whole; cannot locate assistant turns"
            )
        # Templates may strip the content, so search for the stripped text after the prompt.
        content = message["content"].strip()
        start = full_text.find(content, len(prompt_text)) if content else len(prompt_text)
        if start < 0:
            raise DataError(f"{conversation.source}: the chat template dropped or altered assistant turn {index}")
        spans.append((start, start + len(content)))

    encoding = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    offsets = encoding["offset_mapping"]
    special_ids = set(tokenizer.all_special_ids) | {
        token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special
    }
    loss_mask = [False] * len(input_ids)
    token_index = 0
    for span_start, span_end in spans:
        # A token belongs to the turn if it overlaps the content (" Great" starts on the space
        # before "Great", and the model does write that token).
        while token_index < len(input_ids) and offsets[token_index][1] <= span_start:
            token_index += 1
        while token_index < len(input_ids) and offsets[token_index][0] < span_end:
            loss_mask[token_index] = True
            token_index += 1
        # The end-of-turn token: the first special token after the content, skipping only whitespace.
        while token_index < len(input_ids):
            token_id = input_ids[token_index]
            if token_id in special_ids:
                loss_mask[token_index] = True
                token_index += 1
                break
            start, end = offsets[token_index]
            if full_text[start:end].strip():
                break
            token_index += 1
    ids = torch.tensor(input_ids[:max_length], dtype=torch.long)
    mask = torch.tensor(loss_mask[:max_length], dtype=torch.bool)
    return ids, mask


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(tokenizer.chat_template).encode())
    return digest.hexdigest()


def code_fingerprint() -> str:
    """What turns records into tokens and masks besides the data and the tokenizer: this module's own
    source (parsing, rendering, masking, truncating, dropping) and the libraries that render the
    template and tokenize. A hash of the source, not a version number bumped by hand, so that no
    change to the code can be forgotten (an edit to a comment costs one re-tokenization, seconds)."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for package in ("transformers", "tokenizers", "jinja2"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)};".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=none;".encode())
    return digest.hexdigest()


def data_cache_key(data: bytes, tokenizer, max_length: int, skip_invalid: bool) -> str:
    """The tokenized-data cache key: the file's bytes, the tokenizer (vocabulary, merges, chat
    template, which ids count as special: the end-of-turn token joins the mask by that), the
    options and `code_fingerprint()`."""
    key = hashlib.sha256(data)
    key.update(tokenizer_fingerprint(tokenizer).encode())
    special_ids = sorted(set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special})
    key.update(f"special={special_ids};max_length={max_length};skip_invalid={skip_invalid};".encode())
    key.update(code_fingerprint().encode())
    return key.hexdigest()[:32]


@dataclass
class TokenizedData:
    """All examples concatenated: ids/mask [N_total], with lengths [num_examples]."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    lengths: torch.Tensor
    num_invalid: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def example(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[index])
        end = start + int(self.lengths[index])
        return self.input_ids[start:end], self.loss_mask[start:end]

    @property
    def starts(self) -> torch.Tensor:
        if not hasattr(self, "_starts"):
            self._starts = torch.cumsum(self.lengths, 0) - self.lengths
        return self._starts

    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def load_tokenized(
    path: str | os.PathLike,
    tokenizer,
    max_length: int,
    skip_invalid: bool = False,
    cache_dir: str | os.PathLike | None = None,
    log=print,
) -> TokenizedData:
    """Read, validate, render and tokenize a JSONL file, reusing a cached result when nothing changed."""
    from medusaforge.models import cache_root

    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenized"
    cache_file = cache_dir / f"{data_cache_key(path.read_bytes(), tokenizer, max_length, skip_invalid)}.safetensors"
    if cache_file.is_file():
        try:
            tensors = load_file(str(cache_file))
            side = json.loads(cache_file.with_suffix(".json").read_text())
            num_invalid, messages = int(side["num_invalid"]), list(side["messages"])
            log(f"tokenized data: reusing cache {cache_file}")
            for message in messages:  # what the first run said about the data holds for this one too
                log(message)
            return TokenizedData(tensors["input_ids"], tensors["loss_mask"].bool(), tensors["lengths"], num_invalid)
        except Exception as error:  # a damaged cache is rebuilt, never trusted
            log(f"tokenized data: ignoring unreadable cache {cache_file} ({error})")

    conversations, errors = read_conversations(path, skip_invalid=skip_invalid)
    all_ids, all_masks, lengths = [], [], []
    truncated_away: list[str] = []  # "file:line" of conversations left without an assistant token
    for conversation in conversations:
        ids, mask = tokenize_conversation(tokenizer, conversation, max_length)
        if not mask.any():  # truncation removed every assistant token: nothing to learn from it
            truncated_away.append(conversation.source)
            continue
        all_ids.append(ids)
        all_masks.append(mask)
        lengths.append(len(ids))
    if not lengths:
        raise DataError(f"{path}: no example keeps an assistant token within max_length={max_length}")
    messages = []  # logged now and stored with the cache, to be logged again on every hit
    if truncated_away:
        messages.append(f"dropped {len(truncated_away)} conversations whose assistant turns all lie beyond "
                        f"max_length={max_length} (first: {truncated_away[0]})")
    messages += [f"skipped: {error}" for error in errors[:5]]
    for message in messages:
        log(message)
    data = TokenizedData(torch.cat(all_ids), torch.cat(all_masks), torch.tensor(lengths), len(errors))
    staging = temporary_path_beside(cache_file)
    save_file(
        {"input_ids": data.input_ids, "loss_mask": data.loss_mask.to(torch.uint8), "lengths": data.lengths},
        str(staging),
    )
    # The .json first: a cache file that exists always has its side file.
    atomic_write_text(cache_file.with_suffix(".json"),
                      json.dumps({"source": str(path), "num_invalid": len(errors), "messages": messages}))
    commit_file(staging, cache_file)
    return data


def collate(examples: list[tuple[torch.Tensor, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of (ids, mask) to [B, T]; padding is masked out of attention and loss."""
    longest = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        input_ids[row, : len(ids)] = ids
        loss_mask[row, : len(ids)] = mask
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
