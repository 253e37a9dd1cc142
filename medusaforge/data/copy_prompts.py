"""The built-in `copy-heavy` prompt set: requests whose answers copy from a text in the prompt.

Prompt-lookup drafting wins where the reply repeats its input (summaries that quote, extraction,
rewrites, answers about a pasted passage) and loses on open chat, so a speed comparison needs both
kinds of traffic. This set is built from data installed offline, deterministically:
  - mt-bench:         MT-Bench first turns that paste a text to work on: every `extraction`
                      question, the writing question that edits a paragraph (90), the reasoning
                      question about a passage (105) and the coding question that pastes a
                      function (124);
  - chitchat-extract: summarise or quote from a real chitchat-dataset conversation;
  - chitchat-rewrite: rewrite one long chitchat message (a paragraph written by a person);
  - chitchat-question: answer a question about a pasted chitchat conversation.
The chitchat texts are whole conversations and long messages, picked with a fixed seed; `distill`
uses only the first message of each conversation as a prompt, and the replies we evaluate here are
the base model's own, so no reply the heads trained on is an answer in this set.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from medusaforge.data.chitchat import chitchat_conversations, turn_texts

# MT-Bench first turns that paste their working text after the first line.
MT_BENCH_CATEGORIES = ("extraction",)
MT_BENCH_EXTRA_IDS = (90, 105, 124)
SEED = 14
NUM_EXTRACT, NUM_REWRITE, NUM_QUESTION = 12, 10, 10
TRANSCRIPT_CHARS = (500, 1200)  # long enough to quote from, short enough for a quick CPU prefill
PARAGRAPH_CHARS = (300, 900)

EXTRACT_REQUESTS = (
    "Summarize the conversation below in three sentences, quoting the most important message of each speaker.",
    "List every question that speaker A asks in the conversation below, quoting each one exactly.",
    "Extract the topics the two speakers talk about in the conversation below, with a short quote for each topic.",
    "Quote the messages in the conversation below in which a speaker says something about themselves, one per line.",
)
REWRITE_REQUESTS = (
    "Rewrite the following paragraph with correct spelling, grammar and punctuation, keeping its wording as far as possible.",
    "Rewrite the following paragraph in a more formal tone, keeping every point it makes.",
    "Correct the spelling and grammar of the paragraph below and return the corrected paragraph.",
)
QUESTION_REQUESTS = (
    "Read the conversation below. What does speaker B say about their own plans or activities? Quote the lines that tell you.",
    "Read the conversation below. Which of speaker A's questions does speaker B answer, and how? Quote each question and its answer.",
    "Read the conversation below. Where does the conversation change topic? Quote the message where each change happens.",
)


@dataclass(frozen=True)
class CopyPrompt:
    kind: str  # "mt-bench", "chitchat-extract", "chitchat-rewrite" or "chitchat-question"
    request: str  # what to do with the text
    source_text: str  # the text the answer is expected to copy from; always part of the prompt

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": f"{self.request}\n\n{self.source_text}"}]


def copy_heavy_prompts(mt_bench_file: Path) -> list[CopyPrompt]:
    """Every prompt of the set, in a fixed order: one of each kind in turn (MT-Bench, extract,
    rewrite, question) until a kind runs out.
    mt_bench_file: MT-Bench's question.jsonl (data/prompts.py finds the installed one)."""
    conversations = chitchat_conversations()
    rng = random.Random(SEED)
    transcripts = [t for t in map(_transcript, conversations) if TRANSCRIPT_CHARS[0] <= len(t) <= TRANSCRIPT_CHARS[1]]
    paragraphs = sorted({p for c in conversations for p in turn_texts(c) if PARAGRAPH_CHARS[0] <= len(p) <= PARAGRAPH_CHARS[1]})
    picked = rng.sample(transcripts, NUM_EXTRACT + NUM_QUESTION)
    kinds = [
        _mt_bench_prompts(mt_bench_file),
        [CopyPrompt("chitchat-extract", EXTRACT_REQUESTS[i % len(EXTRACT_REQUESTS)], t) for i, t in enumerate(picked[:NUM_EXTRACT])],
        [CopyPrompt("chitchat-rewrite", REWRITE_REQUESTS[i % len(REWRITE_REQUESTS)], p) for i, p in enumerate(rng.sample(paragraphs, NUM_REWRITE))],
        [CopyPrompt("chitchat-question", QUESTION_REQUESTS[i % len(QUESTION_REQUESTS)], t) for i, t in enumerate(picked[NUM_EXTRACT:])],
    ]
    # Kinds taken in turn, so any prefix (--limit N) mixes all of them.
    return [prompt for group in itertools.zip_longest(*kinds) for prompt in group if prompt is not None]


def _mt_bench_prompts(path: Path) -> list[CopyPrompt]:
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("category") not in MT_BENCH_CATEGORIES and record.get("question_id") not in MT_BENCH_EXTRA_IDS:
            continue
        request, newline, text = record["turns"][0].partition("\n")
        if not newline or not text.strip():
            raise ValueError(f"{path}:{number}: MT-Bench question {record.get('question_id')} has no pasted text after its first line")
        prompts.append(CopyPrompt("mt-bench", request.strip(), text.strip()))
    return prompts


def _transcript(conversation: list[list[str]]) -> str:
    # Speakers alternate turns in the dataset; A opens.
    return "\n".join(f"{'AB'[i % 2]}: {message}" for i, message in enumerate(turn_texts(conversation)))
