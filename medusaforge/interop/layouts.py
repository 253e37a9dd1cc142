"""Our heads -> the layouts that serving engines load (tensors and dicts in, tensors and dicts out).

Two engine layouts (docs/formats.md lists the loaders these rules were read from, vLLM 0.32's
`model_executor/models/medusa.py` first):

vLLM, `speculative_config={"method": "medusa", "model": DIR}`: `config.json` with
`model_type: medusa` and `*.safetensors` holding
  blocks.{h}.layers.{l}.weight / .bias   [hidden, hidden] / [hidden]  (bias only read if medusa_fc_bias)
  lm_heads.{h}.weight                    [vocab, hidden]   one per head, always the FULL vocabulary
  lm_heads.0.weight                      with original_lm_head: the one shared projection, whose rows
                                         the loader slices with token_map (so it may be truncated)
  token_map                              [truncated_vocab] int (read only if truncated_vocab_size < vocab_size)

Original Medusa (FasterDecoding; TensorRT-LLM's converter until it was removed; vLLM 0.32 reads
it too): `config.json` with `medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`
(plus `hidden_size`, `vocab_size` and `medusa_fc_bias`, which vLLM needs), and
`medusa_lm_head.safetensors` (or the pickle `medusa_lm_head.pt`) holding
  {h}.{l}.linear.weight / .bias          [hidden, hidden] / [hidden]
  {h}.{L}.weight                         [vocab, hidden]   (L = num_layers; absent in the legacy
                                                             layout, whose heads reuse the base lm_head)

Heads with their own projections over a truncated vocabulary fit neither layout's per-head rows,
so their rows are widened to the full vocabulary by `full_vocab.full_vocab_rows`. Reading the
layouts back is `layout_readers.py`'s job, telling them apart `importer.py`'s, writing folders
`commands/export.py`'s.
"""

from __future__ import annotations

import warnings

import torch

from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.full_vocab import SHADOW, ZERO, full_vocab_rows

VLLM = "vllm"
MEDUSA = "medusa"
FORMATS = (VLLM, MEDUSA)
VLLM_WEIGHTS_FILE = "model.safetensors"
MEDUSA_WEIGHTS_FILE = "medusa_lm_head.safetensors"
MEDUSA_PICKLE_FILE = "medusa_lm_head.pt"
# Our own fields ride along in the engines' config.json under this key, so a round trip keeps the
# base model's name and fingerprint. Engines ignore unknown keys; vLLM renames top-level keys that
# contain "num" and "heads"/"layers", which this name avoids.
PROVENANCE_KEY = "medusaforge"
# vLLM top-1 chains: shadow rows keep every head's top-1. Tree readers of the original layout take
# top-k per head, where shadow copies would tie with the real candidates: zero rows there.
FILL_FOR_FORMAT = {VLLM: SHADOW, MEDUSA: ZERO}


class FormatWarning(UserWarning):
    """A checkpoint was imported, but something in it disagreed with its own config."""


def widened(heads: MedusaHeads) -> bool:
    """True when the export widens truncated rows to the full vocabulary (every layout we write
    does: vLLM 0.32 cannot load a truncated vocabulary at all, see to_vllm)."""
    return heads.token_map is not None


def to_vllm(heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Our heads -> (vLLM tensors, vLLM config.json dict).

    - Own projections, full vocabulary: `lm_heads.{k}` as they are.
    - Shared lm_head: `original_lm_head: true`, which reads one projection from
      `lm_heads.0.weight` in the checkpoint (not from the base model), so it needs the base weight.
    - Truncated (own or shared): vLLM builds per-head lm_heads over the full vocabulary, and with
      `truncated_vocab_size < vocab_size` its loader turns `token_map` into a parameter that it
      then reports as "not initialized from checkpoint" (vLLM 0.32: no truncated checkpoint
      loads). So the rows are widened with shadow rows and `truncated_vocab_size` is the full
      vocabulary. `token_map` is still written: vLLM ignores it then, and our import uses it to
      restore the trained heads.
    """
    config = heads.config
    tensors = {}
    for k, head in enumerate(heads.heads):
        for l, block in enumerate(head.blocks):
            tensors[f"blocks.{k}.layers.{l}.weight"] = block.linear.weight
            tensors[f"blocks.{k}.layers.{l}.bias"] = block.linear.bias
        if not config.shared_lm_head:
            tensors[f"lm_heads.{k}.weight"] = _head_rows(heads, k, FILL_FOR_FORMAT[VLLM])
    if config.shared_lm_head:
        tensors["lm_heads.0.weight"] = _shared_rows(heads, base_lm_head_weight, FILL_FOR_FORMAT[VLLM])
    if heads.token_map is not None:
        tensors["token_map"] = heads.token_map
    engine_config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "truncated_vocab_size": config.vocab_size if widened(heads) else config.head_vocab_size,
        # vLLM builds its layers without bias unless told; ours always have one.
        "medusa_fc_bias": True,
        "original_lm_head": config.shared_lm_head,
        "torch_dtype": _dtype_name(tensors),
        PROVENANCE_KEY: _provenance(heads, widened(heads) and SHADOW),
    }
    return _detached(tensors), engine_config


def to_medusa(
    heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None = None, base_model_name_or_path: str = ""
) -> tuple[dict, dict]:
    """Our heads -> (original-Medusa tensors, config.json dict).

    The format has no token map and every head owns a full [vocab, hidden] projection
    (TensorRT-LLM reads `{h}.{L}.weight` for every head). So shared heads get a copy of the base
    lm_head each, and truncated heads are widened with zero rows (`full_vocab`): readers of this
    layout build trees from each head's top-k, where shadow rows would tie.
    """
    config = heads.config
    if config.num_layers > 1:
        warnings.warn(
            f"{config.num_layers} ResBlocks per head: TensorRT-LLM and vLLM load each layer, but "
            "FasterDecoding's reference code builds its layers as one shared module (`[ResBlock(h)] * n`), "
            "so it would run the last layer's weights n times.",
            FormatWarning,
            stacklevel=2,
        )
    fill = FILL_FOR_FORMAT[MEDUSA]
    tensors = {}
    for k, head in enumerate(heads.heads):
        for l, block in enumerate(head.blocks):
            tensors[f"{k}.{l}.linear.weight"] = block.linear.weight
            tensors[f"{k}.{l}.linear.bias"] = block.linear.bias
        if config.shared_lm_head:
            # Copies, not one shared tensor: safetensors refuses tensors that share storage.
            tensors[f"{k}.{config.num_layers}.weight"] = _shared_rows(heads, base_lm_head_weight, fill).clone()
        else:
            tensors[f"{k}.{config.num_layers}.weight"] = _head_rows(heads, k, fill)
    engine_config = {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": base_model_name_or_path or config.base_model,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        # vLLM reads this layout too (method "medusa"), and without the flag drops the ResBlock biases.
        "medusa_fc_bias": True,
        "torch_dtype": _dtype_name(tensors),
        PROVENANCE_KEY: _provenance(heads, heads.token_map is not None and fill),
    }
    return _detached(tensors), engine_config


def exported_rows(heads: MedusaHeads, fmt: str, base_lm_head_weight: torch.Tensor | None = None) -> list[torch.Tensor]:
    """[vocab, hidden] per head: the projection an engine runs after loading `fmt` (for agreement checks)."""
    if heads.config.shared_lm_head:
        return [_shared_rows(heads, base_lm_head_weight, FILL_FOR_FORMAT[fmt])] * heads.num_heads
    return [_head_rows(heads, k, FILL_FOR_FORMAT[fmt]) for k in range(heads.num_heads)]


def _head_rows(heads: MedusaHeads, k: int, fill: str) -> torch.Tensor:
    weight = heads.heads[k].lm_head.weight
    if heads.token_map is None:
        return weight
    return full_vocab_rows(weight, heads.token_map, heads.config.vocab_size, fill)


def _shared_rows(heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None, fill: str) -> torch.Tensor:
    """[vocab, hidden]: the base lm_head, or with a token map its mapped rows widened by `fill`."""
    shared = _shared_weight(heads, base_lm_head_weight)
    if heads.token_map is None:
        return shared
    token_map = heads.token_map.to(shared.device)
    return full_vocab_rows(shared[token_map], token_map, heads.config.vocab_size, fill)


def _shared_weight(heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None) -> torch.Tensor:
    weight = base_lm_head_weight if base_lm_head_weight is not None else heads.shared_weight
    if weight is None:
        raise ValueError(
            "these heads share the base model's lm_head, and the engine format needs that weight written "
            "into the checkpoint: pass the base model (--model)."
        )
    return weight.detach()


def _provenance(heads: MedusaHeads, widened_fill: str | bool = False) -> dict:
    config = heads.config
    return {
        "base_model": config.base_model,
        "base_fingerprint": config.base_fingerprint,
        "shared_lm_head": config.shared_lm_head,
        "head_vocab_size": config.head_vocab_size,
        # How rows outside the token map were filled when the layout forced a full vocabulary.
        "widened_vocab_fill": widened_fill or None,
        "extra": config.extra,
    }


def _detached(tensors: dict) -> dict:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def _dtype_name(tensors: dict) -> str:
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return str(floats[0]).removeprefix("torch.") if floats else "float32"
