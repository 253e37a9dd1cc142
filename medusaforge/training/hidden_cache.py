"""Reading a `medusaforge cache` folder (written by commands/cache.py) for offline training.

Layout of the folder:
  index.json                  what made the cache (model, weights, tokenizer, data, max_length),
                              and the list of complete shards, in order
  shard-00000.safetensors     hidden [tokens, hidden] (bf16/fp16/fp32), input_ids [tokens] int32,
                              loss_mask [tokens] uint8, lengths [examples] int64, and with
                              `cache --eagle3-features` also features [tokens, 3 * hidden]: the HF
                              hidden_states at identity["feature_layers"], concatenated (EAGLE-3's input);
                              base_argmax [tokens] int32 and log_normaliser [tokens] fp32: the base's
                              full-vocabulary argmax and logsumexp at each token (from the stored state)

Reading: `HiddenCache(dir)`; `.data` (TokenizedData: ids, masks, lengths), `.hidden(i)` [T, H] final
post-norm states of example i, `.features(i)` [T, 3H], `.feature_layers` (tuple or None).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from medusaforge.data.conversations import TokenizedData
from medusaforge.models import weights_fingerprint

INDEX_FILE = "index.json"
FORMAT_NAME = "medusaforge-hidden-cache"
FORMAT_VERSION = 1


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
        layers = self.identity.get("feature_layers")
        self.feature_layers = tuple(layers) if layers else None
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
        self.names = set(self.handles[0].keys()) if self.handles else set()
        self.shard_starts = [torch.cumsum(lengths_of, 0) - lengths_of for lengths_of in lengths]

    def __len__(self) -> int:
        return len(self.data)

    def _rows(self, name: str, example_index: int) -> torch.Tensor:
        shard = bisect.bisect_right(self.first_examples, example_index) - 1
        local = example_index - self.first_examples[shard]
        start = int(self.shard_starts[shard][local])
        length = int(self.data.lengths[example_index])
        return self.handles[shard].get_slice(name)[start : start + length]

    def has(self, name: str) -> bool:
        """Whether the shards hold tensor `name` (caches made before base_argmax/log_normaliser existed do not)."""
        return name in self.names

    def padded(self, name: str, indices: list[int], shape: torch.Size) -> torch.Tensor:
        """Tensor `name` of examples `indices`, padded with zeros to [B, T] (+ its row width, if any)."""
        stored = [self._rows(name, i) for i in indices]  # memory-mapped reads
        out = torch.zeros((*shape, *stored[0].shape[1:]), dtype=stored[0].dtype)
        for row, rows in enumerate(stored):
            out[row, : len(rows)] = rows
        return out

    def hidden(self, example_index: int) -> torch.Tensor:
        """[T, hidden] stored final hidden states of one example (read from the memory-mapped shard)."""
        return self._rows("hidden", example_index)

    def features(self, example_index: int) -> torch.Tensor:
        """[T, len(feature_layers) * hidden] stored intermediate hidden states of one example (EAGLE-3's
        fused input: hidden_states[i] for i in `feature_layers`, concatenated in that order)."""
        if self.feature_layers is None:
            raise ValueError(f"{self.directory}: this cache holds only final hidden states; "
                             "make it with `medusaforge cache --eagle3-features` for EAGLE-3 training")
        return self._rows("features", example_index)

    def check_model(self, model: str | os.PathLike) -> None:
        """Refuse a base model other than the one that made the cache."""
        recorded = self.identity["weights_fingerprint"]
        actual = weights_fingerprint(model)
        if actual != recorded:
            raise ValueError(
                f"{self.directory}: the cache was made from model {self.identity['model']!r} (weights fingerprint {recorded}); "
                f"--model {model} has fingerprint {actual}. Pass the model that made the cache, or rebuild the cache."
            )
