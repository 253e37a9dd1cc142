"""Distill through a serving engine: an OpenAI-compatible chat-completions client (vLLM, SGLang, ...).

The server applies the model's chat template to the same messages the built-in distill renders, so
a reply is what the served model writes for the prompt. Replies are written as they arrive, one
record per line, each followed by flush and fsync (data/distilled.py has the record): a killed run
loses only the requests in flight, and a rerun asks only for the prompts not in the file yet. A
run that ends puts the file in prompt order.

A drafter learns the model that wrote its data. The served weights must be exactly those it will
be trained against (same checkpoint, revision and fine-tune); the server's model name and `root`
(vLLM reports the folder or hub id it loaded) are checked against `--model` before anything is asked.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from urllib.parse import urlsplit

import httpx
from tqdm import tqdm

from medusaforge.data.distilled import distilled_record, done_keys, prompt_keys, read_distilled, repair_torn_tail, sort_into_prompt_order
from medusaforge.files import atomic_write_text, read_json

GOOD_FINISH_REASONS = ("stop", "length")
RETRIED_STATUS = (408, 429, 500, 502, 503, 504)  # the server may recover; any other refusal will not


class EndpointError(RuntimeError):
    """The endpoint cannot serve this run; the message says what it answered and what to do."""


class PromptTooLong(Exception):
    """The server refused one prompt as longer than its context: that prompt is skipped, not the run
    (hence not an EndpointError, which stops the run)."""


@dataclass
class EndpointSettings:
    url: str  # base URL, e.g. http://localhost:8000/v1
    model: str  # the model the drafter is trained against (`--model`)
    served_model: str  # the name to ask the server for ("": `--model` if served, else its only model)
    max_tokens: int
    temperature: float
    seed: int  # sampling only: request i gets seed + i, so a resumed run samples the same way
    reasoning: str  # "keep" or "strip" the reasoning text of reasoning models
    concurrency: int
    timeout: float  # seconds per request
    retries: int  # transport errors and HTTP 408/429/5xx are retried this often, with backoff
    check_served_model: bool = True


@dataclass
class Reply:
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int


def api_base(url: str) -> str:
    """'http://host:8000' -> 'http://host:8000/v1'; a URL with a path is taken as the API base."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--endpoint {url!r}: expected a URL such as http://localhost:8000/v1")
    return url if parts.path else url + "/v1"


def reply_text(message: dict, reasoning: str) -> str:
    """The assistant message -> the reply to train on. Reasoning models answer with thinking text
    either inline ('<think>...</think> answer', or '... </think> answer' when the template opened
    the block) or, with a reasoning parser, in a separate field (vLLM: 'reasoning', older servers:
    'reasoning_content'). 'keep' puts it back inline, as the model wrote it; 'strip' drops it."""
    content = message.get("content") or ""
    thinking = message.get("reasoning") or message.get("reasoning_content")
    if reasoning == "strip":
        return content.split("</think>", 1)[-1].strip()
    if thinking:
        return f"<think>\n{thinking.strip()}\n</think>\n\n{content.strip()}"
    return content.strip()


def _spellings(name: str) -> set[str]:
    """A model reference -> what it may match: itself, its last path part in lower case (a hub id
    'org/Name' and a folder '/models/name'), and its absolute path when it is a local folder."""
    spellings = {name, name.rstrip("/").rsplit("/", 1)[-1].lower()}
    if Path(name).exists():
        spellings.add(str(Path(name).resolve()))
    return spellings


def names_match(requested: str, served: list[str | None]) -> bool:
    served_spellings = set().union(*(_spellings(name) for name in served if name))
    return bool(_spellings(requested) & served_spellings)


def _headers() -> dict:
    key = os.environ.get("OPENAI_API_KEY")  # from the environment only, never from a config file
    return {"Authorization": f"Bearer {key}"} if key else {}


def _json_of(response: httpx.Response, what: str):
    try:
        return response.json()
    except ValueError:
        raise EndpointError(f"{what} answered HTTP {response.status_code} with a body that is not JSON: "
                            f"{response.text[:200]!r}; is this an OpenAI-compatible API base (ending in /v1)?") from None


def served_models(base: str, timeout: float) -> list[dict]:
    """GET /models -> the model cards ({"id", "root", ...}) the server serves."""
    try:
        response = httpx.get(f"{base}/models", headers=_headers(), timeout=timeout)
    except httpx.TransportError as error:
        raise EndpointError(f"cannot reach {base} ({type(error).__name__}: {error}); is the server running and "
                            f"listening there? (e.g. `vllm serve MODEL --port 8000` serves http://localhost:8000/v1)") from None
    if response.status_code >= 400:
        raise EndpointError(f"{base}/models refused with HTTP {response.status_code}: {response.text[:300]}")
    cards = _json_of(response, f"{base}/models")
    cards = cards.get("data") if isinstance(cards, dict) else None
    if not isinstance(cards, list) or not all(isinstance(c, dict) and "id" in c for c in cards):
        raise EndpointError(f"{base}/models answered JSON without a 'data' list of models")
    return cards


def choose_model(cards: list[dict], settings: EndpointSettings) -> dict:
    """The served model card to ask, refusing a name the server does not serve or weights that are
    not `--model`'s by name."""
    ids = [card["id"] for card in cards]
    listing = ", ".join(repr(i) for i in ids) or "nothing"
    wanted = settings.served_model or (settings.model if settings.model in ids else None)
    if wanted is None and len(cards) != 1:
        raise EndpointError(f"{settings.url} serves {listing}: name the one to ask with --served-model")
    if wanted is not None and wanted not in ids:
        raise EndpointError(f"{settings.url} does not serve model {wanted!r}; it serves {listing}")
    card = next(card for card in cards if wanted in (None, card["id"]))
    served = [card["id"], card.get("root")]
    if settings.check_served_model and not names_match(settings.model, served):
        raise EndpointError(
            f"{settings.url} serves {card['id']!r} (root {card.get('root')!r}), but the drafter is to be trained "
            f"against --model {settings.model!r}; replies of other weights teach the drafter another model. "
            "Pass the served model as --model, or --check-served-model false if it is the same checkpoint under another name")
    return card


def _parse_reply(response: httpx.Response, index: int, reasoning: str, what: str) -> Reply:
    data = _json_of(response, what)
    try:
        choice = data["choices"][0]
        text = reply_text(choice["message"], reasoning)
    except (KeyError, IndexError, TypeError):
        raise EndpointError(f"{what} answered JSON without choices[0].message: {json.dumps(data)[:200]}") from None
    usage = data.get("usage") or {}
    return Reply(index, text, choice.get("finish_reason"), int(usage.get("completion_tokens") or 0))


async def request_reply(client: httpx.AsyncClient, settings: EndpointSettings, model: str, index: int, prompt: list[dict]) -> Reply:
    """One chat completion; transport errors and HTTP 408/429/5xx are retried with backoff."""
    body = {"model": model, "messages": prompt, "max_tokens": settings.max_tokens,
            "temperature": settings.temperature, "top_p": 1.0}  # top_p 1: the server's default top_p would not be ours
    if settings.temperature > 0:
        body["seed"] = settings.seed + index
    what = f"{settings.url}/chat/completions (prompt {index})"
    for attempt in range(settings.retries + 1):
        if attempt:
            await asyncio.sleep(0.5 * 2 ** (attempt - 1))
        try:
            response = await client.post("chat/completions", json=body)
        except httpx.TransportError as error:
            problem = f"{what}: no answer ({type(error).__name__}: {error or 'connection lost'})"
            continue
        if response.status_code >= 400:
            problem = f"{what} refused the request with HTTP {response.status_code}: {response.text[:300]}"
            if response.status_code in RETRIED_STATUS:
                continue
            # vLLM, SGLang and OpenAI all name the context length when a prompt does not fit in it.
            if response.status_code == 400 and "context length" in response.text.lower():
                raise PromptTooLong(problem)
            break
        return _parse_reply(response, index, settings.reasoning, what)
    tries = f" (after {settings.retries + 1} tries)" if settings.retries else ""
    raise EndpointError(problem + tries)


@dataclass
class Tally:
    """What one run asked and wrote."""

    written: int = 0
    finished: int = 0
    tokens: int = 0  # completion tokens by the server's own count (usage)
    empty: int = 0
    not_started: int = 0  # prompts the time limit left out
    too_long: int = 0  # prompts the server refused as longer than its context
    first_too_long: str = ""
    odd_finishes: int = 0  # finish reasons other than stop/length
    first_odd: str = ""
    seconds: float = 0.0


def append_record(handle, record: dict) -> None:
    """One line, flushed and fsynced: a reply written is a reply kept, whatever happens next."""
    handle.write(json.dumps(record) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _take(reply: Reply | PromptTooLong | None, prompts: list[list[dict]], tally: Tally, handle, bar) -> None:
    """Count one answer and write it if it is a reply to keep."""
    if reply is None:
        tally.not_started += 1
    elif isinstance(reply, PromptTooLong):
        tally.too_long += 1
        if not tally.first_too_long:
            tally.first_too_long = str(reply)
            bar.write(f"distill: {reply}; skipped (counted, reported at the end)", file=sys.stderr)
    elif reply.finish_reason not in GOOD_FINISH_REASONS:
        tally.odd_finishes += 1
        if not tally.first_odd:
            tally.first_odd = f"prompt {reply.index} ended with finish reason {reply.finish_reason!r}: {reply.text[:80]!r}"
            bar.write(f"distill: {tally.first_odd}; not written (counted, reported at the end)", file=sys.stderr)
    elif not reply.text:
        tally.empty += 1  # the built-in distill writes no empty reply either
    else:
        finished = reply.finish_reason == "stop"
        append_record(handle, distilled_record(prompts[reply.index], reply.text, finished))
        tally.written += 1
        tally.finished += finished
        tally.tokens += reply.completion_tokens


async def _ask_all(prompts: list[list[dict]], todo: list[int], settings: EndpointSettings, model: str, handle,
                   progress: bool, max_seconds: float) -> Tally:
    """`concurrency` workers take prompts in order and queue their answers (or their error); this
    coroutine alone writes. After an error the answers already queued are still written."""
    tally, started = Tally(), perf_counter()
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    answers: asyncio.Queue = asyncio.Queue()
    pending = iter(todo)  # shared by the workers: one event loop thread, so each index is taken once
    bar = tqdm(total=len(todo), disable=not progress, desc="distill", unit="reply")

    async def worker(client):
        for index in pending:
            # Start no request past the time limit; those in flight finish.
            if max_seconds and perf_counter() - started > max_seconds:
                await answers.put(None)
                continue
            try:
                await answers.put(await request_reply(client, settings, model, index, prompts[index]))
            except PromptTooLong as refused:
                await answers.put(refused)
            except EndpointError as error:
                await answers.put(error)
                return

    async with httpx.AsyncClient(base_url=settings.url + "/", timeout=settings.timeout, limits=limits, headers=_headers()) as client:
        workers = [asyncio.create_task(worker(client)) for _ in range(min(settings.concurrency, len(todo)))]
        try:
            for _ in todo:
                answer = await answers.get()
                if isinstance(answer, EndpointError):
                    for worker_task in workers:
                        worker_task.cancel()
                    while not answers.empty():  # replies that arrived before the error are kept
                        queued = answers.get_nowait()
                        if not isinstance(queued, EndpointError):
                            _take(queued, prompts, tally, handle, bar)
                    raise answer
                _take(answer, prompts, tally, handle, bar)
                bar.update(1)
                elapsed = perf_counter() - started
                bar.set_postfix_str(f"{tally.written / elapsed:.2f} replies/s, {tally.tokens / elapsed:.0f} tok/s", refresh=False)
        finally:
            for worker_task in workers:
                worker_task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            bar.close()
            tally.seconds = perf_counter() - started
    return tally


def _settings_path(out: Path) -> Path:
    return out.with_name(out.name + ".endpoint.json")


def _check_same_settings(out: Path, recorded: dict, now: dict) -> None:
    """A resumed file must be continued with the settings that wrote it."""
    for key in ("model", "max_tokens", "temperature", "reasoning", "seed"):
        if recorded.get(key) != now.get(key):
            raise EndpointError(f"{out} was written with {key} {recorded.get(key)!r} ({_settings_path(out)}); this run "
                                f"asks {now.get(key)!r}. Pass --overwrite to start again, or another --out")


def distill_through_endpoint(prompts: list[list[dict]], out: Path, settings: EndpointSettings, overwrite: bool = False,
                             progress: bool = True, max_seconds: float = 0.0) -> Tally:
    """Ask the endpoint for every prompt not yet in `out` and append the replies (see the module doc)."""
    settings.url = api_base(settings.url)
    card = choose_model(served_models(settings.url, settings.timeout), settings)
    print(f"distill: asking {settings.url} for {card['id']!r} (root {card.get('root')!r}); the drafter is trained against "
          f"--model {settings.model!r}, and the server must serve exactly those weights", file=sys.stderr)
    recorded = {"model": settings.model, "max_tokens": settings.max_tokens, "temperature": settings.temperature,
                "reasoning": settings.reasoning, "seed": settings.seed if settings.temperature > 0 else None,
                "served_model": card["id"], "served_root": card.get("root"), "endpoint": settings.url}
    out.parent.mkdir(parents=True, exist_ok=True)
    if overwrite:
        out.unlink(missing_ok=True)
    keys = prompt_keys(prompts)
    done: set[str] = set()
    if out.exists():
        if _settings_path(out).exists():
            _check_same_settings(out, read_json(_settings_path(out), "distill settings"), recorded)
        if cut := repair_torn_tail(out):
            print(f"distill: {out}: cut a half-written last line ({cut} bytes) that a killed run left", file=sys.stderr)
        done = set(done_keys(read_distilled(out)))
        print(f"distill: resuming {out}: {sum(key in done for key in keys)} of {len(prompts)} prompts already there", file=sys.stderr)
    atomic_write_text(_settings_path(out), json.dumps(recorded, indent=2) + "\n")
    todo = [index for index, key in enumerate(keys) if key not in done]
    try:
        with open(out, "a", encoding="utf-8") as handle:
            tally = asyncio.run(_ask_all(prompts, todo, settings, card["id"], handle, progress, max_seconds))
    except EndpointError as error:
        kept = len(read_distilled(out))
        raise EndpointError(f"{error}\nThe {kept} replies in {out} are kept; rerunning the same command asks only for the rest") from None
    sort_into_prompt_order(out, keys)
    return tally
