"""Conversion between our heads and the layouts that serving engines load (tensors and dicts only).

Two engine layouts (docs/formats.md lists the loaders these rules were read from):

vLLM, `speculative_config={"method": "medusa", "model": DIR}`: `config.json` with
`model_type: medusa` and `*.safetensors` holding
  blocks.{h}.layers.{l}.weight / .bias   [hidden, hidden] / [hidden]  (bias only read if medusa_fc_bias)
  lm_heads.{h}.weight                    [truncated_vocab, hidden]   (only lm_heads.0 if original_lm_head)
  token_map                              [truncated_vocab] int       (only if truncated_vocab_size < vocab_size)

Original Medusa (FasterDecoding; TensorRT-LLM's medusa converter reads the same files):
`config.json` with `medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`, and
`medusa_lm_head.safetensors` (or the pickle `medusa_lm_head.pt`) holding
  {h}.{l}.linear.weight / .bias          [hidden, hidden] / [hidden]
  {h}.{L}.weight                         [vocab, hidden]   (L = num_layers; absent in the legacy
                                                             layout, whose heads reuse the base lm_head)

Everything here is tensors and dicts in, tensors and dicts out. Reading folders (and telling the
layouts apart) is importer.py's job, writing them export.py's.
"""

from __future__ import annotations

import re
import warnings

import torch

from medusaforge.drafters.medusa_heads import MedusaHeads

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


class FormatWarning(UserWarning):
    """A checkpoint was imported, but something in it disagreed with its own config."""


# ---- our heads -> engine tensors ---------------------------------------------------------------


def to_vllm(heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None = None) -> tuple[dict, dict]:
    """Our heads -> (vLLM tensors, vLLM config.json dict).

    Shared-lm_head heads become vLLM's `original_lm_head: true`, which reads one projection from
    `lm_heads.0.weight` in the checkpoint (not from the base model), so it needs the base weight.
    """
    config = heads.config
    tensors = {}
    for k, head in enumerate(heads.heads):
        for l, block in enumerate(head.blocks):
            tensors[f"blocks.{k}.layers.{l}.weight"] = block.linear.weight
            tensors[f"blocks.{k}.layers.{l}.bias"] = block.linear.bias
        if not config.shared_lm_head:
            tensors[f"lm_heads.{k}.weight"] = head.lm_head.weight
    if config.shared_lm_head:
        # Full rows even when truncated: vLLM's loader slices rows by token_map when there are more.
        tensors["lm_heads.0.weight"] = _shared_weight(heads, base_lm_head_weight)
    if heads.token_map is not None:
        tensors["token_map"] = heads.token_map
    engine_config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "num_heads": config.num_heads,
        "num_hidden_layers": config.num_layers,
        "truncated_vocab_size": config.head_vocab_size,
        # vLLM builds its layers without bias unless told; ours always have one.
        "medusa_fc_bias": True,
        "original_lm_head": config.shared_lm_head,
        "torch_dtype": _dtype_name(tensors),
        PROVENANCE_KEY: _provenance(heads),
    }
    return _detached(tensors), engine_config


def to_medusa(
    heads: MedusaHeads,
    base_lm_head_weight: torch.Tensor | None = None,
    expand_vocab: bool = False,
    base_model_name_or_path: str = "",
) -> tuple[dict, dict]:
    """Our heads -> (original-Medusa tensors, config.json dict).

    The format has no token map and every head owns a full [vocab, hidden] projection
    (TensorRT-LLM reads `{h}.{L}.weight` for every head). So shared heads get a copy of the base
    lm_head each, and truncated heads are refused unless `expand_vocab`: then rows outside the
    token map are filled with the base lm_head's rows, the rows every head was initialised from.
    A linear projection without bias cannot make a row "very negative" for every hidden state, and
    zero rows would give logit 0, which beats every real token whenever the real logits are all
    negative; base rows keep out-of-map tokens competing as the base model would rank them.
    """
    config = heads.config
    truncated = heads.token_map is not None
    if truncated and not config.shared_lm_head and not expand_vocab:
        raise ValueError(
            f"these heads project to a truncated vocabulary ({config.head_vocab_size} of {config.vocab_size} "
            "tokens) and the original Medusa format has no token map. Export with --format vllm (which keeps "
            "the token map), or pass --expand-vocab to write full-vocabulary projections whose rows outside "
            "the token map copy the base lm_head (needs the base model)."
        )
    if config.num_layers > 1:
        warnings.warn(
            f"{config.num_layers} ResBlocks per head: TensorRT-LLM loads each layer, but FasterDecoding's "
            "reference code builds its layers as one shared module (`[ResBlock(h)] * n`), so it would run "
            "the last layer's weights n times.",
            FormatWarning,
            stacklevel=2,
        )
    tensors = {}
    for k, head in enumerate(heads.heads):
        for l, block in enumerate(head.blocks):
            tensors[f"{k}.{l}.linear.weight"] = block.linear.weight
            tensors[f"{k}.{l}.linear.bias"] = block.linear.bias
        if config.shared_lm_head:
            # Copies, not one shared tensor: safetensors refuses tensors that share storage.
            weight = _shared_weight(heads, base_lm_head_weight).clone()
        elif truncated:
            weight = _expanded(head.lm_head.weight, heads.token_map, base_lm_head_weight, config.vocab_size)
        else:
            weight = head.lm_head.weight
        tensors[f"{k}.{config.num_layers}.weight"] = weight
    engine_config = {
        "medusa_num_heads": config.num_heads,
        "medusa_num_layers": config.num_layers,
        "base_model_name_or_path": base_model_name_or_path or config.base_model,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "torch_dtype": _dtype_name(tensors),
        PROVENANCE_KEY: _provenance(heads, expanded_vocab=truncated and not config.shared_lm_head),
    }
    return _detached(tensors), engine_config


def _shared_weight(heads: MedusaHeads, base_lm_head_weight: torch.Tensor | None) -> torch.Tensor:
    weight = base_lm_head_weight if base_lm_head_weight is not None else heads.shared_weight
    if weight is None:
        raise ValueError(
            "these heads share the base model's lm_head, and the engine format needs that weight written "
            "into the checkpoint: pass the base model (--model)."
        )
    return weight


def _expanded(weight: torch.Tensor, token_map: torch.Tensor, base_weight: torch.Tensor | None, vocab: int):
    """[head_vocab, hidden] rows at token_map -> [vocab, hidden], other rows from the base lm_head."""
    if base_weight is None:
        raise ValueError("--expand-vocab fills the rows outside the token map from the base lm_head: pass --model")
    if tuple(base_weight.shape) != (vocab, weight.shape[1]):
        raise ValueError(f"base lm_head has shape {tuple(base_weight.shape)}, heads expect ({vocab}, {weight.shape[1]})")
    full = base_weight.detach().to(weight.dtype).clone()
    full[token_map.to(full.device)] = weight.detach().to(full.device)
    return full


def _provenance(heads: MedusaHeads, expanded_vocab: bool = False) -> dict:
    config = heads.config
    return {
        "base_model": config.base_model,
        "base_fingerprint": config.base_fingerprint,
        "shared_lm_head": config.shared_lm_head,
        "head_vocab_size": config.head_vocab_size,
        "expanded_vocab": expanded_vocab,
        "extra": config.extra,
    }


def _detached(tensors: dict) -> dict:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def _dtype_name(tensors: dict) -> str:
    floats = [t.dtype for t in tensors.values() if t.is_floating_point()]
    return str(floats[0]).removeprefix("torch.") if floats else "float32"


# ---- engine tensors -> our heads ---------------------------------------------------------------


def from_vllm(tensors: dict, config: dict, source: str = "vllm checkpoint") -> MedusaHeads:
    """vLLM tensors + config -> our heads, computing what vLLM's loader would compute."""
    # vLLM strips this prefix and renames any config key holding "num" and "heads"/"layers".
    tensors = {name.removeprefix("medusa_heads."): t for name, t in tensors.items()}
    stated_heads = _config_value(config, "heads")
    stated_layers = _config_value(config, "layers")
    blocks = _indexed(tensors, r"blocks\.(\d+)\.layers\.(\d+)\.(weight|bias)")
    lm_heads = {int(m[0]): t for m, t in _indexed(tensors, r"lm_heads\.(\d+)\.weight").items()}
    original_lm_head = bool(config.get("original_lm_head", False))
    num_heads = _count_heads(blocks, {} if original_lm_head else lm_heads, stated_heads, source)
    num_layers = _count_layers(blocks, num_heads, stated_layers, source)
    vocab_size = int(config["vocab_size"])
    head_vocab = int(config.get("truncated_vocab_size") or vocab_size)
    token_map = tensors.get("token_map") if head_vocab < vocab_size else None
    if head_vocab < vocab_size and token_map is None:
        raise ValueError(f"{source}: truncated_vocab_size {head_vocab} < vocab_size {vocab_size} but no token_map tensor")
    has_bias = any(key[2] == "bias" for key in blocks)
    if has_bias and not config.get("medusa_fc_bias", False):
        warnings.warn(
            f"{source}: the checkpoint has ResBlock biases but medusa_fc_bias is not true, so vLLM ignores "
            "them; importing them as zero, which is what vLLM runs.",
            FormatWarning,
            stacklevel=2,
        )
    use_bias = bool(config.get("medusa_fc_bias", False))
    layers = {}
    for k in range(num_heads):
        for l in range(num_layers):
            weight = _require(blocks, (str(k), str(l), "weight"), source, f"blocks.{k}.layers.{l}.weight")
            bias = blocks.get((str(k), str(l), "bias")) if use_bias else None
            if use_bias and bias is None:
                raise ValueError(f"{source}: medusa_fc_bias is true but blocks.{k}.layers.{l}.bias is missing")
            layers[k, l] = (weight, bias)
    if original_lm_head:
        projections = {0: _require(lm_heads, 0, source, "lm_heads.0.weight")}
    else:
        projections = {k: _require(lm_heads, k, source, f"lm_heads.{k}.weight") for k in range(num_heads)}
    if token_map is not None:
        # Rows beyond the map are the full vocabulary: vLLM keeps only the mapped ones.
        projections = {k: w[token_map.long()] if w.shape[0] > head_vocab else w for k, w in projections.items()}
        if original_lm_head:
            # Our shared heads read the full base lm_head, so a truncated shared one becomes copies.
            projections = {k: projections[0] for k in range(num_heads)}
            original_lm_head = False
    hidden_size = _hidden_size(layers, projections, config, source)
    return _assemble(
        source, hidden_size, vocab_size, num_heads, num_layers, layers, projections,
        shared=original_lm_head, token_map=token_map, provenance=config.get(PROVENANCE_KEY) or {},
    )


def from_medusa(
    tensors: dict, config: dict, vocab_size: int | None = None, source: str = "medusa checkpoint"
) -> MedusaHeads:
    """Original-Medusa tensors + config -> our heads.

    The head and layer counts come from the weights. The original repo's published configs state
    the wrong `medusa_num_heads` (its own loader overrides it with a hard-coded 5), so a mismatch
    warns and the weights win. Without `{h}.{L}.weight` keys (the legacy layout) the heads reuse
    the base lm_head; `vocab_size` (from the base model) is then needed if the config lacks it.
    """
    for prefix in ("medusa_head.", "medusa_heads."):
        if tensors and all(name.startswith(prefix) for name in tensors):
            tensors = {name.removeprefix(prefix): t for name, t in tensors.items()}
    blocks = _indexed(tensors, r"(\d+)\.(\d+)\.linear\.(weight|bias)")
    projection_keys = _indexed(tensors, r"(\d+)\.(\d+)\.weight")
    stated_heads = config.get("medusa_num_heads")
    stated_layers = config.get("medusa_num_layers")
    heads_seen = {int(k) for k, *_ in blocks} | {int(k) for k, _ in projection_keys}
    num_heads = _count_heads(blocks, {int(k): None for k, _ in projection_keys}, stated_heads, source)
    # With layers the projection index is one past the last ResBlock; without, it is 0.
    if blocks:
        num_layers = _count_layers(blocks, num_heads, stated_layers, source)
    else:
        num_layers = 0
    projections = {k: projection_keys.get((str(k), str(num_layers))) for k in heads_seen}
    legacy = all(w is None for w in projections.values())
    if not legacy:
        projections = {k: _require(projections, k, source, f"{k}.{num_layers}.weight") for k in range(num_heads)}
    stray = set(projection_keys) - {(str(k), str(num_layers)) for k in range(num_heads)}
    if stray:
        raise ValueError(f"{source}: unexpected projection tensors {sorted('.'.join(s) for s in stray)[:4]}")
    layers = {}
    for k in range(num_heads):
        for l in range(num_layers):
            weight = _require(blocks, (str(k), str(l), "weight"), source, f"{k}.{l}.linear.weight")
            bias = blocks.get((str(k), str(l), "bias"))
            layers[k, l] = (weight, bias)
    if any(bias is None for _, bias in layers.values()):
        warnings.warn(f"{source}: ResBlocks without bias; importing zero biases", FormatWarning, stacklevel=2)
    provenance = config.get(PROVENANCE_KEY) or {}
    if legacy:
        vocab = vocab_size or config.get("vocab_size")
        if vocab is None:
            raise ValueError(
                f"{source}: legacy Medusa layout (heads reuse the base lm_head, no projection weights) "
                "and no vocab_size in config.json: load it together with its base model"
            )
        projections, shared = {}, True
    else:
        vocab = next(iter(projections.values())).shape[0]
        shared = provenance.get("shared_lm_head", False) and _all_equal(list(projections.values()))
        if shared:
            projections = {0: projections[0]}
    hidden_size = _hidden_size(layers, projections, config, source)
    return _assemble(
        source, hidden_size, int(vocab), num_heads, num_layers, layers, projections,
        shared=shared, token_map=None, provenance=provenance,
    )


def _assemble(
    source, hidden_size, vocab_size, num_heads, num_layers, layers, projections, shared, token_map, provenance
) -> MedusaHeads:
    """Build MedusaHeads from per-(head, layer) (weight, bias) and per-head projections, checking shapes."""
    head_vocab = int(token_map.shape[0]) if token_map is not None else None
    heads = MedusaHeads(
        hidden_size, vocab_size, num_heads, num_layers,
        shared_lm_head=shared, head_vocab_size=head_vocab, base_model=provenance.get("base_model", ""),
    )
    heads.config.base_fingerprint = provenance.get("base_fingerprint", "")
    heads.config.extra = dict(provenance.get("extra") or {})
    state = {}
    for (k, l), (weight, bias) in layers.items():
        state[f"heads.{k}.blocks.{l}.linear.weight"] = weight
        state[f"heads.{k}.blocks.{l}.linear.bias"] = bias if bias is not None else torch.zeros(hidden_size, dtype=weight.dtype)
    if shared:
        if projections:
            heads.shared_weight = projections[0].detach()
    else:
        for k, weight in projections.items():
            state[f"heads.{k}.lm_head.weight"] = weight
    if token_map is not None:
        token_map = token_map.long()
        if token_map.min() < 0 or token_map.max() >= vocab_size or token_map.unique().numel() != token_map.numel():
            raise ValueError(f"{source}: token_map must hold distinct token ids in [0, {vocab_size})")
        state["token_map"] = token_map
    expected = heads.state_dict()
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    heads.load_state_dict(state, strict=True)
    return heads


def _indexed(tensors: dict, pattern: str) -> dict:
    """Tensors whose names fully match `pattern`, keyed by the pattern's groups."""
    regex = re.compile(pattern)
    return {match.groups(): t for name, t in tensors.items() if (match := regex.fullmatch(name))}


def _count_heads(blocks: dict, projections: dict, stated, source: str) -> int:
    indices = {int(key[0]) for key in blocks} | {int(k) for k in projections}
    if not indices:
        raise ValueError(f"{source}: no Medusa head weights found")
    count = max(indices) + 1
    missing = sorted(set(range(count)) - indices)
    if missing:
        raise ValueError(f"{source}: weights for heads {missing} are missing (found heads up to {count - 1})")
    if stated is not None and int(stated) != count:
        warnings.warn(
            f"{source}: config.json says {stated} heads but the weights hold {count}; using {count} "
            "(the original Medusa release's configs state the wrong count)",
            FormatWarning,
            stacklevel=3,
        )
    return count


def _count_layers(blocks: dict, num_heads: int, stated, source: str) -> int:
    per_head = [{int(key[1]) for key in blocks if int(key[0]) == k} for k in range(num_heads)]
    counts = {max(layers) + 1 if layers else 0 for layers in per_head}
    if len(counts) != 1:
        raise ValueError(f"{source}: heads have different numbers of ResBlocks ({sorted(counts)})")
    count = counts.pop()
    if stated is not None and int(stated) != count:
        warnings.warn(
            f"{source}: config.json says {stated} layers per head but the weights hold {count}; using {count}",
            FormatWarning,
            stacklevel=3,
        )
    return count


def _config_value(config: dict, what: str):
    """vLLM's rule: the config key holding "num" and `what` ("heads" or "layers") is the count."""
    for key, value in config.items():
        if "num" in key and what in key:
            return value
    return None


def _require(mapping: dict, key, source: str, name: str) -> torch.Tensor:
    if mapping.get(key) is None:
        raise ValueError(f"{source}: missing tensor {name}")
    return mapping[key]


def _hidden_size(layers: dict, projections: dict, config: dict, source: str) -> int:
    if layers:
        hidden = next(iter(layers.values()))[0].shape[1]
    elif projections:
        hidden = next(iter(projections.values())).shape[1]
    elif "hidden_size" in config:
        hidden = config["hidden_size"]
    else:
        raise ValueError(f"{source}: cannot tell the hidden size")
    if "hidden_size" in config and int(config["hidden_size"]) != hidden:
        raise ValueError(f"{source}: config.json says hidden_size {config['hidden_size']}, the weights {hidden}")
    return int(hidden)


def _all_equal(tensors: list) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])
