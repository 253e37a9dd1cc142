"""`medusaforge cache`: run the base model once and store its final hidden states for offline training.

Medusa heads read one tensor of the base model: the final post-norm hidden state. Storing it per
token (plus the token id and the loss mask) lets `medusaforge train --cache DIR` train heads for
many epochs without ever running the base model again: about hidden_size * 2 bytes per token in
bf16/fp16, a third of an EAGLE-3 cache, which reads four layers.

Layout of DIR:
  index.json                  what made the cache (model, weights, tokenizer, data, max_length),
                              and the list of complete shards, in order
  shard-00000.safetensors     hidden [tokens, hidden] (bf16/fp16/fp32), input_ids [tokens] int32,
                              loss_mask [tokens] uint8, lengths [examples] int64, base_argmax [tokens]
                              int32 and log_normaliser [tokens] fp32 (the base's full-vocabulary
                              argmax and logsumexp), and with --eagle3-features, features
A shard is written under a temporary name and renamed when complete, and only then listed in
index.json (itself replaced atomically). A killed run leaves at most an unlisted file, which the
next run overwrites: it resumes after the last listed shard and ends byte-identical to a run
that was never interrupted (shard boundaries depend only on the data and the options).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusaforge.config import dtype_option, option
from medusaforge.files import atomic_write_text, commit_file, refuse_non_empty, temporary_path_beside
from medusaforge.data.conversations import TokenizedData, collate, load_tokenized, tokenizer_fingerprint
from medusaforge.training.eagle3_features import base_statistics
from medusaforge.training.hidden_cache import FORMAT_NAME, FORMAT_VERSION, INDEX_FILE
from medusaforge.drafters.eagle3 import check_feature_layers, default_feature_layers
from medusaforge.models import (
    DEFAULT_MODEL,
    base_fingerprint,
    final_and_feature_states,
    final_hidden_states,
    lm_head_of,
    load_base_model,
    load_tokenizer,
    model_name,
    resolve_device,
    resolve_dtype,
    weights_fingerprint,
)

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
    eagle3_features: bool = option(False, "also store the intermediate hidden states an EAGLE-3 draft reads: --feature-layers, by default (2, L//2, L-3) of an L-layer base as vLLM/SpecForge")
    feature_layers: list[int] | None = option(None, "HF hidden_states indices stored with --eagle3-features (0: embeddings, j: output of layer j-1; implies --eagle3-features)")
    overwrite: bool = option(False, "replace a cache in --out that was made from other inputs")
    trust_remote_code: bool = option(False, "allow the model's own Python code from its folder (off by default)")

    def validate(self) -> None:
        if self.data is None or self.out is None:
            raise ValueError("--data and --out are required")
        if self.batch_size < 1 or self.shard_mb <= 0 or self.max_length < 2:
            raise ValueError("--batch-size must be >= 1, --shard-mb > 0, --max-length >= 2")
        if self.feature_layers is not None:
            self.eagle3_features = True


def feature_layers_of(config: CacheConfig, num_layers: int) -> tuple[int, ...] | None:
    """The hidden_states indices to store beside the final state, or None (a Medusa-only cache)."""
    if not config.eagle3_features:
        return None
    return check_feature_layers(config.feature_layers or default_feature_layers(num_layers), num_layers)


# ---- which model made the cache ---------------------------------------------------------------


def cache_identity(config: CacheConfig, base, tokenizer, hidden_size: int, vocab_size: int, feature_layers=None) -> dict:
    """Everything that decides the cache's bytes; a resume or a training run must match it."""
    values_per_token = hidden_size * (1 + len(feature_layers or ()))
    identity = {
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
        "shard_tokens": max(1, int(config.shard_mb * 2**20) // (values_per_token * CACHE_DTYPES[config.cache_dtype].itemsize)),
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "base_statistics": ["base_argmax", "log_normaliser"],
    }
    if feature_layers is not None:  # absent from Medusa-only caches, so caches made before still match
        identity["feature_layers"] = list(feature_layers)
    return identity


# ---- writing ----------------------------------------------------------------------------------


def write_index(directory: Path, index: dict) -> None:
    """Replace index.json atomically (temporary file, fsync, rename)."""
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a shard under a temporary name and rename it: a reader never sees half a shard."""
    staging = temporary_path_beside(path)
    save_file(tensors, str(staging))
    commit_file(staging, path)


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
def hidden_states_of_examples(base, data: TokenizedData, first: int, end: int, batch_size: int, pad_token_id: int, autocast, storage_dtype,
                              feature_layers=None) -> dict[str, torch.Tensor]:
    """Run the base over examples [first, end) in batches -> one shard's tensors (padding dropped);
    with `feature_layers`, also "features" [tokens, len(feature_layers) * hidden]. Every shard also
    holds the base's full-vocabulary argmax and logsumexp per token, computed from the *stored*
    (rounded) final state, as training reads it: 8 bytes a token that spare offline training a
    whole-vocabulary lm_head product per epoch (EAGLE-3's targets, the heads' soft targets)."""
    device = next(base.parameters()).device
    hidden_rows, feature_rows = [], []
    for batch_start in range(first, end, batch_size):
        examples = [data.example(i) for i in range(batch_start, min(batch_start + batch_size, end))]
        batch = collate(examples, pad_token_id)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with autocast:
            if feature_layers is None:
                hidden, features = final_hidden_states(base, input_ids, attention_mask), None
            else:
                hidden, features = final_and_feature_states(base, input_ids, attention_mask, feature_layers)
        for row, (ids, _) in enumerate(examples):
            hidden_rows.append(hidden[row, : len(ids)].to(storage_dtype).cpu())
            if features is not None:
                feature_rows.append(features[row, : len(ids)].to(storage_dtype).cpu())
    ids = torch.cat([data.example(i)[0] for i in range(first, end)])
    mask = torch.cat([data.example(i)[1] for i in range(first, end)])
    tensors = {
        "hidden": torch.cat(hidden_rows).contiguous(),
        "input_ids": ids.to(torch.int32),
        "loss_mask": mask.to(torch.uint8),
        "lengths": data.lengths[first:end].clone(),
    }
    if feature_rows:
        tensors["features"] = torch.cat(feature_rows).contiguous()
    with autocast:
        argmax, log_normaliser = base_statistics(tensors["hidden"].to(device).float(), lm_head_of(base).weight)
    tensors["base_argmax"] = argmax.to(torch.int32).cpu()
    tensors["log_normaliser"] = log_normaliser.float().cpu()
    return tensors


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
    feature_layers = feature_layers_of(config, base.config.num_hidden_layers)
    identity = cache_identity(config, base, tokenizer, weight.shape[1], weight.shape[0], feature_layers)
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
    else:
        refuse_non_empty(out, config.overwrite, hint="it holds no cache index; pass --overwrite to write into it")
    out.mkdir(parents=True, exist_ok=True)
    if index["shards"]:
        print(f"cache: resuming after {len(index['shards'])} of {len(plan)} complete shards", file=sys.stderr)

    started = time.perf_counter()
    storage_dtype = CACHE_DTYPES[config.cache_dtype]
    for shard_number in range(len(index["shards"]), len(plan)):
        first, end = plan[shard_number]
        tensors = hidden_states_of_examples(base, data, first, end, config.batch_size, tokenizer.pad_token_id, autocast, storage_dtype, feature_layers)
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
               "hidden_bytes_per_token": identity["hidden_size"] * storage_dtype.itemsize,
               "feature_bytes_per_token": identity["hidden_size"] * len(feature_layers or ()) * storage_dtype.itemsize,
               "feature_layers": list(feature_layers) if feature_layers else None, "seconds": round(time.perf_counter() - started, 1)}
    features = f", features of layers {summary['feature_layers']} {summary['feature_bytes_per_token']}" if feature_layers else ""
    print(f"cache: {len(data)} conversations, {num_tokens} tokens, {size / 2**20:.1f} MiB "
          f"({summary['bytes_per_token']:.1f} bytes/token; final hidden states {summary['hidden_bytes_per_token']}{features}) in {out}")
    return summary
