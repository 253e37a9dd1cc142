"""`medusaforge distill`: let the base model write the assistant replies (self-distillation).

Heads trained on the model's own replies learn what the model really says, which matters more for
acceptance than anything else (on SmolLM2: 0.44 head-0 top-1 on own replies against 0.16 on
human text). Prompts come from the user turns of a JSONL file or from the built-in sources
(`chitchat`, `instructions`, `self`, or several in turn; `self` asks the base model to write the
requests too, data/self_requests.py); replies are generated in batches (left padding),
greedy by default.

With `--endpoint URL` the replies come from a serving engine instead (vLLM, SGLang, any
OpenAI-compatible server; data/endpoint.py): the same prompts, sent as the same messages, so the
server renders the same chat template. That run is resumable: rerun the same command and only the
prompts missing from --out are asked.
"""

from __future__ import annotations

import itertools
import json
import sys
from time import perf_counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from medusaforge.config import dtype_option, option
from medusaforge.files import atomic_file
from medusaforge.data.batch_generation import generate_batch
from medusaforge.data.chitchat import chitchat_conversations
from medusaforge.data.conversations import read_conversations
from medusaforge.data.distilled import distilled_record
from medusaforge.data.endpoint import EndpointSettings, distill_through_endpoint
from medusaforge.data.instructions import instruction_prompts
from medusaforge.data.self_requests import end_of_turn_ids, finished_text, self_requests
from medusaforge.models import DEFAULT_MODEL, load_base_model, load_tokenizer, resolve_device, resolve_dtype

BUILTIN_SOURCES = ("chitchat", "instructions", "self")


@dataclass
class DistillConfig:
    """Generate assistant replies with the base model and write ShareGPT JSONL."""

    model: str = option(DEFAULT_MODEL, "base model: local HF folder, hub id, or the built-in smollm2-135m-instruct "
                                       "(with --endpoint: the model the drafter is trained against, checked against the served one)")
    prompts: str = option("chitchat", "JSONL whose user turns are the prompts, or built-in sources: 'chitchat', 'instructions', "
                                      "'self' (requests the base model writes itself), or several joined by '+' (taken in turn)")
    out: Path = option(Path("runs/distill.jsonl"), "output ShareGPT JSONL")
    num_prompts: int = option(256, "how many prompts to use (0: all)")
    skip_prompts: int = option(0, "skip this many prompts first (to make a disjoint held-out set)")
    max_new_tokens: int = option(128, "maximum reply length in tokens")
    batch_size: int = option(64, "prompts per generation batch")
    max_minutes: float = option(0.0, "start no new batch once this many minutes of generation have passed (0: no limit); "
                                     "the prompts not reached are left out, so a slow host writes fewer replies, not later")
    temperature: float = option(0.0, "0 for greedy (default), otherwise sampling temperature")
    min_prompt_chars: int = option(8, "skip prompts shorter than this many characters")
    max_prompt_tokens: int = option(0, "skip prompts whose rendered chat is longer than this many tokens (0: no limit; not with "
                                       "--endpoint): one long prompt pads its whole batch, and a reply past the training's "
                                       "--max-length is cut off anyway")
    seed: int = option(0, "random seed (prompt order for chitchat, sampling)")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = dtype_option("auto", "model dtype: auto (bf16 where the device runs it natively, else fp32), fp32, bf16 or fp16")
    skip_invalid: bool = option(False, "skip bad records in --prompts instead of stopping")
    overwrite: bool = option(False, "replace an existing --out file (with --endpoint: start again instead of resuming)")
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder")
    progress: bool = option(True, "show a progress bar")
    endpoint: str = option("", "OpenAI-compatible server to ask instead of generating here, e.g. http://localhost:8000/v1 "
                               "(vLLM, SGLang); an API key is read from OPENAI_API_KEY")
    served_model: str = option("", "with --endpoint: the model name to ask for (default: --model if served, else the server's only model)")
    check_served_model: bool = option(True, "with --endpoint: refuse a served model whose name and root do not match --model")
    concurrency: int = option(32, "with --endpoint: requests in flight at once (the server batches them)")
    reasoning: str = option("keep", "with --endpoint: keep or strip a reasoning model's thinking text in the replies",
                            choices=["keep", "strip"])
    request_timeout: float = option(600.0, "with --endpoint: seconds to wait for one reply")
    retries: int = option(2, "with --endpoint: retries of a request after a lost connection or HTTP 408/429/5xx")

    def validate(self) -> None:
        if self.max_minutes < 0:
            raise ValueError("--max-minutes must be 0 (no limit) or more")
        if self.max_prompt_tokens < 0 or (self.max_prompt_tokens and self.endpoint):
            raise ValueError("--max-prompt-tokens must be 0 (no limit) or more, and 0 with --endpoint (the server counts the prompts past its context)")
        if self.concurrency < 1 or self.retries < 0 or self.request_timeout <= 0:
            raise ValueError("--concurrency must be 1 or more, --retries 0 or more, --request-timeout above 0")


def chitchat_prompts(min_chars: int, seed: int) -> list[list[dict]]:
    """First messages of the chitchat-dataset conversations (real people opening a chat), shuffled."""
    import random

    prompts, seen = [], set()
    for conversation in chitchat_conversations():
        text = " ".join(message.strip() for message in conversation[0]).strip()
        # Openers like "hello!" repeat; duplicates would leak held-out prompts into training.
        if len(text) >= min_chars and text.lower() not in seen:
            seen.add(text.lower())
            prompts.append([{"role": "user", "content": text}])
    random.Random(seed).shuffle(prompts)
    return prompts


def builtin_prompts(sources: str, min_chars: int, seed: int, self_written: list[list[dict]] | None = None) -> list[list[dict]]:
    """'chitchat', 'instructions', 'self' or several joined by '+': several sources are interleaved one
    prompt at a time, so --num-prompts takes an equal share of each. self_written: the `self`
    source's requests, which only the base model can write (self_request_count says how many)."""
    chitchat = chitchat_prompts(min_chars, seed)
    lists = []
    for name in sources.split("+"):
        if name == "chitchat":
            lists.append(chitchat)
        elif name == "instructions":
            # The request-to-summarise prompts quote chitchat messages other than the chitchat prompts used above.
            openers = [chat[0]["content"] for chat in chitchat[::-1]]
            lists.append(instruction_prompts(seed, openers[: len(openers) // 2]))
        elif name == "self":
            if self_written is None:
                raise ValueError("the 'self' prompt source is written by the base model; distill it with `medusaforge distill`")
            lists.append(self_written)
        else:
            raise ValueError(f"unknown built-in prompt source {name!r}; expected one of {', '.join(BUILTIN_SOURCES)}")
    return [chat for group in itertools.zip_longest(*lists) for chat in group if chat is not None]


def self_request_count(config: DistillConfig) -> int:
    """How many requests the base must write for the `self` share of the prompts asked for (0: none)."""
    parts = config.prompts.split("+") if is_builtin(config.prompts) else []
    if "self" not in parts:
        return 0
    if not config.num_prompts:
        raise ValueError("--prompts with 'self' needs --num-prompts: the base writes that many requests (its share of them)")
    return -(-(config.skip_prompts + config.num_prompts) // len(parts))


def is_builtin(prompts: str) -> bool:
    """A name with any built-in part (and no such file) goes to builtin_prompts, so a misspelt
    part like 'chitchat+instruction' gets its clear error rather than 'file not found'."""
    return not Path(prompts).exists() and any(name in BUILTIN_SOURCES for name in prompts.split("+"))


def file_prompts(path: Path, skip_invalid: bool) -> list[list[dict]]:
    """System + first user turn of each conversation (assistant turns, if any, are regenerated)."""
    conversations, errors = read_conversations(path, skip_invalid=skip_invalid, require_assistant=False)
    prompts = []
    for conversation in conversations:
        prompt = []
        for message in conversation.messages:
            prompt.append(message)
            if message["role"] == "user":
                break
        prompts.append(prompt)
    if errors:
        print(f"distill: skipped {len(errors)} invalid records in {path}", file=sys.stderr)
    return prompts


def generation_batches(lengths: list[int], batch_size: int, batches_per_round: int = 4) -> list[list[int]]:
    """Prompt indices batch by batch: rounds of `batches_per_round` batches taken in the given order,
    sorted by length within each round. Sorting keeps padding (wasted compute) small within a batch;
    sorting only within rounds means a time limit that stops early still keeps prompts of every
    length, not just the shortest."""
    round_size = batch_size * batches_per_round
    batches = []
    for first in range(0, len(lengths), round_size):
        in_round = sorted(range(first, min(first + round_size, len(lengths))), key=lambda i: lengths[i])
        batches += [in_round[i : i + batch_size] for i in range(0, len(in_round), batch_size)]
    return batches


@torch.no_grad()
def generate_replies(
    base, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, temperature: float,
    progress: bool = True, max_seconds: float = 0.0,
) -> list[tuple[str, bool] | None]:
    """Batched generation. Returns (reply text, finished at end-of-turn) per prompt, in order; None
    for the prompts not reached within max_seconds (0: no limit)."""
    tokenizer.padding_side = "left"  # decoder-only batches must be left-padded
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    eos_ids = end_of_turn_ids(base, tokenizer)
    results: list[tuple[str, bool] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), disable=not progress, desc="distill")
    started, slowest_batch = perf_counter(), 0.0
    for batch_indices in generation_batches([len(text) for text in rendered], batch_size):
        elapsed = perf_counter() - started
        # Stop before a batch that would likely end past the limit, not after it.
        if max_seconds and elapsed + slowest_batch > max_seconds:
            break
        encoded = tokenizer(
            [rendered[i] for i in batch_indices], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(base.device)
        replies = generate_batch(base, encoded["input_ids"], encoded["attention_mask"], max_new_tokens, eos_ids, temperature)
        for index, tokens in zip(batch_indices, replies):
            reply = finished_text(tokens, eos_ids, tokenizer)
            # A reply cut off at max_new_tokens is kept whole, and marked unfinished.
            results[index] = (reply, True) if reply is not None else (tokenizer.decode(tokens, skip_special_tokens=True).strip(), False)
        bar.update(len(batch_indices))
        slowest_batch = max(slowest_batch, perf_counter() - started - elapsed)
    bar.close()
    return results


def select_prompts(config: DistillConfig, self_written: list[list[dict]] | None = None) -> list[list[dict]]:
    """The prompt messages of this run, in order (both ways of distilling ask exactly these)."""
    if is_builtin(config.prompts):
        prompts = builtin_prompts(config.prompts, config.min_prompt_chars, config.seed, self_written)
    else:
        prompts = file_prompts(Path(config.prompts), config.skip_invalid)
    prompts = prompts[config.skip_prompts :]
    if config.num_prompts:
        prompts = prompts[: config.num_prompts]
    if not prompts:
        raise ValueError(f"{config.prompts}: no prompts left after --skip-prompts {config.skip_prompts}")
    return prompts


def drop_long_prompts(prompts: list[list[dict]], tokenizer, max_tokens: int) -> list[list[dict]]:
    """The prompts whose rendered chat (generation prompt included) has at most max_tokens tokens."""
    if not max_tokens:
        return prompts
    rendered = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    kept = [prompt for prompt, length in zip(prompts, lengths) if length <= max_tokens]
    if len(kept) < len(prompts):
        print(f"distill: skipped {len(prompts) - len(kept)} of {len(prompts)} prompts longer than --max-prompt-tokens "
              f"{max_tokens} (longest {max(lengths)} tokens)")
    return kept


def run_endpoint(config: DistillConfig, prompts: list[list[dict]], out: Path) -> Path:
    settings = EndpointSettings(
        url=config.endpoint, model=config.model, served_model=config.served_model, max_tokens=config.max_new_tokens,
        temperature=config.temperature, seed=config.seed, reasoning=config.reasoning, concurrency=config.concurrency,
        timeout=config.request_timeout, retries=config.retries, check_served_model=config.check_served_model)
    tally = distill_through_endpoint(prompts, out, settings, config.overwrite, config.progress, config.max_minutes * 60)
    seconds = max(tally.seconds, 1e-9)
    print(f"distill: wrote {tally.written} conversations ({tally.tokens} reply tokens by the server's count, "
          f"{tally.finished} ended at end-of-turn) to {out} in {tally.seconds:.0f}s "
          f"({tally.written / seconds:.2f} replies/s, {tally.tokens / seconds:.0f} tok/s)")
    if tally.not_started:
        print(f"distill: --max-minutes {config.max_minutes:g} reached; {tally.not_started} prompts not asked (a rerun asks them)")
    if tally.empty:
        print(f"distill: {tally.empty} empty replies not written (a rerun asks them again)")
    if tally.too_long:
        print(f"distill: {tally.too_long} prompts longer than the server's context were skipped (first: {tally.first_too_long})")
    if tally.odd_finishes:
        raise RuntimeError(f"{tally.odd_finishes} replies ended with a finish reason other than stop or length and were "
                           f"not written (first: {tally.first_odd}); the {tally.written} others are in {out}, and a rerun asks these again")
    return out


def run(config: DistillConfig) -> Path:
    out = Path(config.out)
    if out.exists() and not config.overwrite and not config.endpoint:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    num_self_requests = self_request_count(config)
    if config.endpoint:
        if num_self_requests:
            raise ValueError("--prompts 'self' is written by the base model here, not by --endpoint; distill it without --endpoint")
        return run_endpoint(config, select_prompts(config), out)
    # Checked before the model loads, so a bad prompts file fails at once.
    prompts = select_prompts(config) if not num_self_requests else None
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    base = load_base_model(config.model, dtype=dtype, device=device, trust_remote_code=config.trust_remote_code, check=False)
    seconds_left = config.max_minutes * 60
    if num_self_requests:
        began = perf_counter()
        written = self_requests(base, tokenizer, num_self_requests, min_chars=config.min_prompt_chars,
                                max_seconds=seconds_left, seed=config.seed, progress=config.progress)
        spent = perf_counter() - began
        print(f"distill: the base wrote {len(written)} of {num_self_requests} requests in {spent:.0f}s")
        prompts = select_prompts(config, written)
        # Writing the requests counts toward --max-minutes: the limit bounds the whole distill.
        seconds_left = max(seconds_left - spent, 1e-9) if seconds_left else 0.0
    prompts = drop_long_prompts(prompts, tokenizer, config.max_prompt_tokens)
    started = perf_counter()
    replies = generate_replies(base, tokenizer, prompts, config.max_new_tokens, config.batch_size, config.temperature,
                               config.progress, seconds_left)
    elapsed = perf_counter() - started
    reached = sum(reply is not None for reply in replies)
    if reached < len(prompts):
        print(f"distill: --max-minutes {config.max_minutes:g} reached after {reached} of {len(prompts)} prompts")

    num_written = num_finished = reply_tokens = 0
    # Atomic: a crash never leaves a half-written data file under the real name.
    with atomic_file(out) as handle:
        for prompt, generated in zip(prompts, replies):
            if generated is None or not generated[0]:
                continue
            reply, finished = generated
            handle.write(json.dumps(distilled_record(prompt, reply, finished)) + "\n")
            num_written += 1
            num_finished += finished
            reply_tokens += len(tokenizer(reply, add_special_tokens=False)["input_ids"])
    print(
        f"distill: wrote {num_written} conversations ({reply_tokens} reply tokens, {num_finished} ended at end-of-turn) "
        f"to {out} in {elapsed:.0f}s ({reply_tokens / max(elapsed, 1e-9):.0f} tok/s)"
    )
    return out
