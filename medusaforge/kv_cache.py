"""The base model's KV cache: transformers' DynamicCache, with each layer's keys and values written
into a buffer allocated ahead instead of concatenated at every step.

DynamicCache appends a step's keys and values with `torch.cat`, which copies the whole cache, in
every layer, at every step. A 32-row distill batch spent a third of its profiled CPU time in that
copy (the wall-clock gain was smaller, 1.07x; docs/benchmarks.md). Here a step writes only its own
rows, and the cache hands the model a view of the filled part. Everything else is DynamicCache's
own: masks, `crop`, `batch_select_indices`. A method that replaces `keys` with a tensor of its own
(a crop is a view and is kept) only makes the next write move the cache back into a buffer.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's cache in a buffer of `capacity` positions, grown by half when a write needs more."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _owns_keys(self) -> bool:
        return (self.key_buffer is not None and self.keys is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == self.key_buffer.data_ptr() and self.keys.shape[0] == self.key_buffer.shape[0]
                # a buffer made under torch.inference_mode cannot be written outside it
                and (torch.is_inference_mode_enabled() or not self.key_buffer.is_inference()))

    def _move_into_buffer(self, length: int, end: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.capacity = max(self.capacity, end + end // 2)
        batch, heads, _, key_dim = key_states.shape
        self.key_buffer = key_states.new_empty(batch, heads, self.capacity, key_dim)
        self.value_buffer = value_states.new_empty(batch, heads, self.capacity, value_states.shape[-1])
        if length:
            self.key_buffer[..., :length, :].copy_(self.keys)
            self.value_buffer[..., :length, :].copy_(self.values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._owns_keys() or end > self.key_buffer.shape[-2]:
            self._move_into_buffer(length, end, key_states, value_states)
        self.key_buffer[..., length:end, :].copy_(key_states)
        self.value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self.key_buffer[..., :end, :]
        self.values = self.value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        super().reset()


def new_kv_cache(config, capacity: int = 0) -> DynamicCache:
    """A DynamicCache for a model with this config whose full-attention layers write into buffers of
    `capacity` positions (0: sized by the first write, then grown). Sliding-window layers, whose
    entries roll, keep transformers' own layer."""
    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older transformers without the config argument
        return DynamicCache()
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def cache_kwarg(model) -> str:
    """The name `model.forward` takes its KV cache by: transformers 5 renamed past_key_values to
    cache. Read from the signature rather than the version."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
