"""Engine layouts -> our heads: what each engine's loader would build from a checkpoint.

The layouts are described in layouts.py (the export direction). Everything here is tensors and
dicts in, `MedusaHeads` out; importer.py reads the folders and picks the function.
"""

from __future__ import annotations

import re
import warnings

import torch

from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.layouts import PROVENANCE_KEY, FormatWarning


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
    provenance = config.get(PROVENANCE_KEY) or {}
    token_map = tensors.get("token_map") if head_vocab < vocab_size else None
    # Our export widens per-head truncated rows to the full vocabulary (vLLM needs them so) and keeps
    # the token map, which vLLM ignores then: the trained rows are the ones at the map.
    restore_truncated = (head_vocab == vocab_size and "token_map" in tensors
                         and int(provenance.get("head_vocab_size") or vocab_size) < vocab_size)
    if restore_truncated:
        token_map = tensors["token_map"]
        head_vocab = int(token_map.shape[0])
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
    # Our widened shared head: its full rows hold the base lm_head's rows at the map, all that a
    # shared head with a token map reads, so it stays shared.
    ours_shared = original_lm_head and provenance.get("shared_lm_head") and projections[0].shape[0] == vocab_size
    if token_map is not None and not ours_shared:
        # Full-vocabulary rows: keep the mapped ones (vLLM's loader slices a shared lm_head the same way).
        projections = {k: w[token_map.long()] if w.shape[0] > head_vocab else w for k, w in projections.items()}
        if original_lm_head:
            # Our shared heads read the full base lm_head, so a truncated shared one becomes copies.
            projections = {k: projections[0] for k in range(num_heads)}
            original_lm_head = False
    hidden_size = _hidden_size(layers, projections, config, source)
    return _assemble(
        source, hidden_size, vocab_size, num_heads, num_layers, layers, projections,
        shared=original_lm_head, token_map=token_map, provenance=provenance,
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
