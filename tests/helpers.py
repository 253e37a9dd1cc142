"""Tiny, in-process stand-ins for the real parts: a random Llama and a byte-level BPE tokenizer
with a ChatML template. Everything here builds in well under a second."""

from __future__ import annotations

import importlib
import json
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello there, how are you today? I am fine, thanks for asking.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "What is the capital of France? The capital of France is Paris.",
    "system user assistant You are a tiny test model.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,!?;:'\"-()\n",
]


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A tiny model + tokenizer folder that `medusaforge` commands load like any HF model."""
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """The same tensors under the same names: the key sets are equal, and each named tensor has the
    same dtype, shape and values. (Zipping two `state_dict().values()` would pair tensors by position
    and stop at the shorter list, so a missing or renamed tensor would pass.)"""
    ours, theirs = a.state_dict(), b.state_dict()
    assert ours.keys() == theirs.keys(), (
        f"only in the first: {sorted(ours.keys() - theirs.keys())}; only in the second: {sorted(theirs.keys() - ours.keys())}"
    )
    for name, tensor in ours.items():
        other = theirs[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, (name, tensor.dtype, other.dtype, tensor.shape, other.shape)
        assert torch.equal(tensor, other), f"{name} differs"


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return Path(path)


def sharegpt(*turns: tuple[str, str]) -> dict:
    return {"conversations": [{"from": role, "value": text} for role, text in turns]}


def learnable_data(path, num_conversations=48, seed=0, reply_words=18):
    """Assistant replies walk a fixed cycle of words, so token t+2 is a function of token t."""
    words = "the quick brown fox jumps over the lazy dog and then".split()
    rng = random.Random(seed)
    records = []
    for _ in range(num_conversations):
        start = rng.randrange(len(words))
        reply = " ".join(words[(start + i) % len(words)] for i in range(reply_words))
        records.append(sharegpt(("human", f"Hello {rng.randrange(100)}"), ("gpt", reply)))
    return write_jsonl(path, records)


def small_data(path, num_conversations=16):
    """Short conversations of uneven length (6-10 reply words), for runs of a few steps."""
    words = "the quick brown fox jumps over the lazy dog and then".split()
    records = []
    for i in range(num_conversations):
        reply = " ".join(words[(i + j) % len(words)] for j in range(6 + i % 5))  # uneven lengths
        records.append(sharegpt(("human", f"Hello {i}"), ("gpt", reply)))
    return write_jsonl(path, records)


def import_benchmark(name: str):
    """A script in benchmarks/ as a module; the folder goes on sys.path because scripts import their siblings."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    return importlib.import_module(name)


def run_torchrun(args: list[str], env: dict, out: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node nproc ARGS` writing into `out`.

    On 2-core CI machines a gloo rank has aborted inside torch's C++ ("terminate called without an
    active exception") twice in --fsdp-base runs (test_distributed, then test_fsdp), before training
    got far; 28 runs here never did. That crash is not what the multi-process tests check, so it gets
    one relaunch from an empty `out`, with its log kept as a warning; any other failure, or a second
    abort, is returned as is.
    faulthandler prints the Python stack of a rank that crashes.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if finished.returncode != 0 and "terminate called without an active exception" in finished.stderr:
        warnings.warn(f"a torchrun rank aborted; relaunching once. Its log:\n{finished.stderr[-6000:]}")
        shutil.rmtree(out, ignore_errors=True)
        finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return finished
