"""`medusaforge cache`: run the base model once and store its final hidden states for offline training.

Medusa heads read one tensor of the base model: the final post-norm hidden state. Storing it per
token (plus the token id and the loss mask) lets `medusaforge train --cache DIR` train heads for
many epochs without ever running the base model again: about hidden_size * 2 bytes per token in
bf16/fp16, a third of an EAGLE-3 cache, which reads four layers.

Layout of DIR:
  index.json                  what made the cache (model, weights, tokenizer, data, max_length),
                              and the list of complete shards, in order
  shard-00000.safetensors     hidden [tokens, hidden] (bf16/fp16/fp32), input_ids [tokens] int32,
                              loss_mask [tokens] uint8, lengths [examples] int64
A shard is written under a temporary name and renamed when complete, and only then listed in
index.json (itself replaced atomically). A killed run leaves at most an unlisted file, which the
next run overwrites: it resumes after the last listed shard and ends byte-identical to a run
that was never interrupted (shard boundaries depend only on the data and the options).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from medusaforge.config import dtype_option, option
from medusaforge.data.conversations import TokenizedData, collate, load_tokenized, tokenizer_fingerprint
from medusaforge.models import (
    DEFAULT_MODEL,
    base_fingerprint,
    final_hidden_states,
    lm_head_of,
    load_base_model,
    load_tokenizer,
    model_name,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)

INDEX_FILE = "index.json"
FORMAT_NAME = "medusaforge-hidden-cache"
FORMAT_VERSION = 1
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # a subset of TORCH_DTYPES


@dataclass
class CacheConfig:
    """Run the base model once over a chat JSONL file and store its final hidden states."""

    model: str = option(DEFAULT_MODEL, "base model: local HF folder, hub id, or the built-in smollm2-135m-instruct")
    data: Path | None = option(None, "training data: JSONL (ShareGPT or OpenAI messages)")
    out: Path | None = option(None, "cache folder (index.json + shard-*.safetensors)")
    max_length: int = option(1024, "truncate each conversation to this many tokens (must match training)")
    batch_size: int = option(8, "conversations per forward pass")
    cache_dtype: str = dtype_option("bf16", "storage dtype of the hidden states (fp32 only for exactness tests)", choices=("bf16", "fp16", "fp32"))
    dtype: str = dtype_option("auto", "compute dtype of the base forward: auto (bf16 where the device runs it natively, else fp32), fp32 or bf16 (as in train)", choices=("auto", "fp32", "bf16"))
    shard_mb: float = option(512.0, "start a new shard after about this many MB of hidden states")
    device: str = option("auto", "cpu, cuda, cuda:N or auto")
    skip_invalid: bool = option(False, "skip bad records (counted and reported) instead of stopping")
    overwrite: bool = option(False, "replace a cache in --out that was made from other inputs")
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder (off by default)")

    def validate(self) -> None:
        if self.data is None or self.out is None:
            raise ValueError("--data and --out are required")
        if self.batch_size < 1 or self.shard_mb <= 0 or self.max_length < 2:
            raise ValueError("--batch-size must be >= 1, --shard-mb > 0, --max-length >= 2")


# ---- which model made the cache ---------------------------------------------------------------


def local_model_folder(model: str | os.PathLike) -> Path:
    """The folder holding the model's files: built-in name -> converted folder; hub id -> the local
    hub snapshot (never downloaded here)."""
    path = Path(resolve_model_path(model))
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), local_files_only=True))
    except Exception as error:
        raise FileNotFoundError(f"model {model!r}: no local folder with its weights ({error})") from None


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights (offline training reads lm_head from them)")
    return files


def weights_fingerprint(model: str | os.PathLike) -> str:
    """A short hash of the model folder's config.json and safetensors files, read without loading
    the model: each file's header (names, shapes, dtypes) and 64 evenly spaced 4 KiB blocks.
    Any fine-tune changes nearly every byte, so it is caught; the read is about 1 MB."""
    folder = local_model_folder(model)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in _weight_files(folder):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(handle.read(header_length))
            for block in range(64):
                handle.seek(size * block // 64)
                digest.update(handle.read(4096))
    return digest.hexdigest()[:16]


def read_lm_head_weight(model: str | os.PathLike) -> torch.Tensor:
    """[vocab, hidden] fp32 lm_head weight, read straight from the folder's safetensors files
    (memory-mapped: nothing else of the model is loaded). Tied models store no lm_head.weight;
    their input embedding is the projection."""
    folder = local_model_folder(model)
    names = {}
    for path in _weight_files(folder):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                names[name] = path
    candidates = ["lm_head.weight"] + sorted(n for n in names if n.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")))
    for name in candidates:
        if name in names:
            if name != "lm_head.weight":
                config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
                if config.get("tie_word_embeddings") is False:
                    raise ValueError(f"{folder}: no lm_head.weight and the config says the embeddings are not tied")
            with safe_open(str(names[name]), framework="pt") as handle:
                return handle.get_tensor(name).float()
    raise ValueError(f"{folder}: found neither lm_head.weight nor a tied input embedding in the safetensors files")


def cache_identity(config: CacheConfig, base, tokenizer, hidden_size: int, vocab_size: int) -> dict:
    """Everything that decides the cache's bytes; a resume or a training run must match it."""
    return {
        "model": model_name(base),
        "base_fingerprint": base_fingerprint(base),
        "weights_fingerprint": weights_fingerprint(config.model),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data_sha256": hashlib.sha256(Path(config.data).read_bytes()).hexdigest(),
        "max_length": config.max_length,
        "skip_invalid": config.skip_invalid,
        "cache_dtype": config.cache_dtype,
        "compute_dtype": str(resolve_dtype(config.dtype, next(base.parameters()).device)).removeprefix("torch."),
        "batch_size": config.batch_size,
        "shard_tokens": max(1, int(config.shard_mb * 2**20) // (hidden_size * CACHE_DTYPES[config.cache_dtype].itemsize)),
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
    }


# ---- writing ----------------------------------------------------------------------------------


def write_index(directory: Path, index: dict) -> None:
    """Replace index.json atomically (temporary file, fsync, rename)."""
    staging = directory / f".{INDEX_FILE}.tmp-{os.getpid()}"
    with open(staging, "w") as handle:
        handle.write(json.dumps(index, indent=1) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, directory / INDEX_FILE)


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a shard under a temporary name and rename it: a reader never sees half a shard."""
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(staging))
    with open(staging, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(staging, path)


def shard_plan(lengths: list[int], batch_size: int, shard_tokens: int) -> list[tuple[int, int]]:
    """[(first_example, end_example)] per shard: consecutive batches of `batch_size` examples until a
    shard holds at least `shard_tokens` tokens. Depends only on the lengths, so a resumed run cuts
    the same shards (and runs the same batches) as an uninterrupted one."""
    shards, start, tokens = [], 0, 0
    for batch_start in range(0, len(lengths), batch_size):
        batch_end = min(batch_start + batch_size, len(lengths))
        tokens += sum(lengths[batch_start:batch_end])
        if tokens >= shard_tokens or batch_end == len(lengths):
            shards.append((start, batch_end))
            start, tokens = batch_end, 0
    return shards


@torch.no_grad()
def hidden_states_of_examples(base, data: TokenizedData, first: int, end: int, batch_size: int, pad_token_id: int, autocast, storage_dtype) -> dict[str, torch.Tensor]:
    """Run the base over examples [first, end) in batches -> one shard's tensors (padding dropped)."""
    device = next(base.parameters()).device
    hidden_rows = []
    for batch_start in range(first, end, batch_size):
        examples = [data.example(i) for i in range(batch_start, min(batch_start + batch_size, end))]
        batch = collate(examples, pad_token_id)
        with autocast:
            hidden = final_hidden_states(base, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        for row, (ids, _) in enumerate(examples):
            hidden_rows.append(hidden[row, : len(ids)].to(storage_dtype).cpu())
    ids = torch.cat([data.example(i)[0] for i in range(first, end)])
    mask = torch.cat([data.example(i)[1] for i in range(first, end)])
    return {
        "hidden": torch.cat(hidden_rows).contiguous(),
        "input_ids": ids.to(torch.int32),
        "loss_mask": mask.to(torch.uint8),
        "lengths": data.lengths[first:end].clone(),
    }


def run(config: CacheConfig) -> dict:
    out = Path(config.out)
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if compute_dtype == torch.bfloat16 else nullcontext()
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    base = load_base_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
    base.requires_grad_(False)
    data = load_tokenized(config.data, tokenizer, config.max_length, skip_invalid=config.skip_invalid, log=lambda m: print(m, file=sys.stderr))
    weight = lm_head_of(base).weight
    identity = cache_identity(config, base, tokenizer, hidden_size=weight.shape[1], vocab_size=weight.shape[0])
    plan = shard_plan(data.lengths.tolist(), config.batch_size, identity["shard_tokens"])

    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "identity": identity, "num_examples": len(data),
             "num_invalid": data.num_invalid, "num_shards": len(plan), "complete": False, "shards": []}
    if (out / INDEX_FILE).is_file():
        existing = json.loads((out / INDEX_FILE).read_text())
        if existing.get("identity") == identity:
            index["shards"] = existing["shards"]
        elif not config.overwrite:
            changed = sorted(k for k in identity if existing.get("identity", {}).get(k) != identity[k])
            raise FileExistsError(f"{out}: holds a cache made from other inputs (differs in {changed}); pass --overwrite to replace it")
        else:
            shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} is not empty and holds no cache index; pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)
    if index["shards"]:
        print(f"cache: resuming after {len(index['shards'])} of {len(plan)} complete shards", file=sys.stderr)

    started = time.perf_counter()
    storage_dtype = CACHE_DTYPES[config.cache_dtype]
    for shard_number in range(len(index["shards"]), len(plan)):
        first, end = plan[shard_number]
        tensors = hidden_states_of_examples(base, data, first, end, config.batch_size, tokenizer.pad_token_id, autocast, storage_dtype)
        name = f"shard-{shard_number:05d}.safetensors"
        write_shard(out / name, tensors)
        index["shards"].append({"file": name, "first_example": first, "num_examples": end - first,
                                "num_tokens": int(tensors["lengths"].sum())})
        write_index(out, index)  # the shard is listed only once it is complete on disk
        print(f"cache: shard {shard_number + 1}/{len(plan)} ({end} of {len(data)} conversations)", file=sys.stderr)
    index["complete"] = True
    write_index(out, index)

    num_tokens = sum(shard["num_tokens"] for shard in index["shards"])
    size = sum((out / shard["file"]).stat().st_size for shard in index["shards"])
    summary = {"conversations": len(data), "tokens": num_tokens, "bytes": size, "bytes_per_token": size / max(1, num_tokens),
               "hidden_bytes_per_token": identity["hidden_size"] * storage_dtype.itemsize, "seconds": round(time.perf_counter() - started, 1)}
    print(f"cache: {len(data)} conversations, {num_tokens} tokens, {size / 2**20:.1f} MiB "
          f"({summary['bytes_per_token']:.1f} bytes/token; hidden states {summary['hidden_bytes_per_token']}) in {out}")
    return summary


# ---- reading ----------------------------------------------------------------------------------


class HiddenCache:
    """A complete cache, opened by memory map: ids and masks are read up front (5 bytes/token),
    hidden states only per example, when asked for."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX_FILE
        try:
            index = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no hidden-state cache here; make one with `medusaforge cache`") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: corrupt cache index ({error})") from None
        if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a medusaforge hidden-state cache (version {FORMAT_VERSION})")
        if not index.get("complete"):
            raise ValueError(f"{self.directory}: the cache is incomplete ({len(index['shards'])} of {index['num_shards']} shards); "
                             "run the same `medusaforge cache` command again to finish it")
        self.identity = index["identity"]
        self.shards = index["shards"]
        self.first_examples = [shard["first_example"] for shard in self.shards]
        self.handles = []
        ids, masks, lengths = [], [], []
        for shard in self.shards:
            shard_path = self.directory / shard["file"]
            try:
                handle = safe_open(str(shard_path), framework="pt")
                ids.append(handle.get_tensor("input_ids").long())
                masks.append(handle.get_tensor("loss_mask").bool())
                lengths.append(handle.get_tensor("lengths"))
            except FileNotFoundError:
                raise FileNotFoundError(f"{shard_path}: missing shard of the hidden-state cache") from None
            except Exception as error:  # SafetensorError and friends: a damaged shard is never trusted
                raise ValueError(f"{shard_path}: corrupt or truncated cache shard ({error}); "
                                 "delete the folder and run `medusaforge cache` again") from None
            self.handles.append(handle)
        # The token data in the same form as the online path's, so splits and batches are shared.
        self.data = TokenizedData(torch.cat(ids), torch.cat(masks), torch.cat(lengths), index.get("num_invalid", 0))
        self.shard_starts = [torch.cumsum(lengths_of, 0) - lengths_of for lengths_of in lengths]

    def __len__(self) -> int:
        return len(self.data)

    def hidden(self, example_index: int) -> torch.Tensor:
        """[T, hidden] stored hidden states of one example (read from the memory-mapped shard)."""
        shard = bisect.bisect_right(self.first_examples, example_index) - 1
        local = example_index - self.first_examples[shard]
        start = int(self.shard_starts[shard][local])
        length = int(self.data.lengths[example_index])
        return self.handles[shard].get_slice("hidden")[start : start + length]

    def check_model(self, model: str | os.PathLike) -> None:
        """Refuse a base model other than the one that made the cache."""
        recorded = self.identity["weights_fingerprint"]
        actual = weights_fingerprint(model)
        if actual != recorded:
            raise ValueError(
                f"{self.directory}: the cache was made from model {self.identity['model']!r} (weights fingerprint {recorded}); "
                f"--model {model} has fingerprint {actual}. Pass the model that made the cache, or rebuild the cache."
            )
