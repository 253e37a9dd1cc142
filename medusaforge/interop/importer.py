"""Reading heads folders in any layout: ours, vLLM's or the original Medusa's.

`import_heads` is the one entry point for a heads folder of any layout: `generate`, `eval`,
`train --init-heads`, Medusa-2 and `export` call it. It tells the layouts apart from the files
(`detect_format`), refuses full models (e.g. Medusa-2 checkpoints with a fine-tuned base inside),
reads our own layout with `drafters.medusa_heads.load_heads`, converts the engines' layouts with
`interop.layout_readers`, and, given the base model, checks that the heads fit it."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from medusaforge.drafters.medusa_heads import CONFIG_FILE, FORMAT_NAME, MedusaHeads, check_heads_match_base, load_heads
from medusaforge.interop.layout_readers import from_medusa, from_vllm
from medusaforge.interop.layouts import MEDUSA, MEDUSA_PICKLE_FILE, MEDUSA_WEIGHTS_FILE, VLLM, FormatWarning

# Tensor names that only a full causal LM has: a folder holding them is a model, not heads.
FULL_MODEL_KEYS = re.compile(r"(^|\.)(embed_tokens|layers\.\d+\.self_attn|h\.\d+\.attn|wte)\.|^lm_head\.weight$")


def read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def read_tensors(path: Path) -> dict:
    """A safetensors file, or a `.pt` state dict loaded with weights_only=True (never runs pickled code)."""
    try:
        if path.suffix == ".pt":
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        else:
            tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing") from None
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{path}: cannot read weights ({error})") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise ValueError(f"{path}: expected a flat name -> tensor state dict")
    return tensors


def is_medusaforge_folder(directory: str | Path) -> bool:
    """True when config.json says format "medusaforge" (the layout `load_heads` reads)."""
    try:
        return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def detect_format(directory: str | Path) -> str:
    """Which layout a folder holds: FORMAT_NAME (ours), VLLM or MEDUSA. Refuses full models."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such heads folder")
    if is_medusaforge_folder(directory):
        return FORMAT_NAME
    config = read_config(directory)
    refuse_full_model(directory, config)
    if (directory / MEDUSA_WEIGHTS_FILE).is_file() or (directory / MEDUSA_PICKLE_FILE).is_file():
        return MEDUSA
    if config.get("model_type") == "medusa":
        return VLLM
    raise ValueError(
        f"{directory}: not a Medusa heads folder. Expected our heads.safetensors + config.json, vLLM's "
        f"config.json with model_type 'medusa', or the original {MEDUSA_WEIGHTS_FILE} / {MEDUSA_PICKLE_FILE}"
    )


def refuse_full_model(directory: Path, config: dict) -> None:
    """Raise if the folder is a whole causal LM (e.g. a Medusa-2 model with heads inside)."""
    model_type = config.get("model_type")
    names = _weight_names(directory)
    full = (model_type not in (None, "", "medusa")) or any(FULL_MODEL_KEYS.search(name) for name in names)
    if not full:
        return
    has_heads = any(k.startswith("medusa") for k in config) or any("medusa_head" in n for n in names)
    kind = "a full Medusa-2 model (fine-tuned base weights with the Medusa heads inside)" if has_heads else "a full model"
    raise ValueError(
        f"{directory}: this is {kind} (model_type={model_type!r}), not a heads checkpoint. medusaforge "
        "imports heads only: pass the heads folder (medusaforge, vLLM or original Medusa layout). "
        + ("Its heads only fit its own fine-tuned base, so load that folder as the base model and train or "
           "export heads against it." if has_heads else "Pass a model folder as --model instead.")
    )


def _weight_names(directory: Path) -> list[str]:
    """Tensor names in the folder's weight files, read from headers only (no tensor data)."""
    names = []
    for path in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                names.extend(handle.keys())
        except (SafetensorError, OSError):
            continue
    for index in directory.glob("*.index.json"):
        try:
            names.extend(json.loads(index.read_text()).get("weight_map", {}))
        except (OSError, json.JSONDecodeError, AttributeError):
            continue
    return names


def import_heads(directory: str | Path, base: nn.Module | None = None, allow_other_base: bool = False) -> MedusaHeads:
    """Load heads from a folder in any supported layout; with `base`, check they fit it."""
    directory = Path(directory)
    fmt = detect_format(directory)
    if fmt == FORMAT_NAME:
        return load_heads(directory, base, allow_other_base)
    config = read_config(directory)
    base_weight = None
    if base is not None:
        from medusaforge.models import lm_head_of

        base_weight = lm_head_of(base).weight
    if fmt == VLLM:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{directory}: vLLM medusa config but no *.safetensors weights")
        tensors = {}
        for path in files:
            tensors.update(read_tensors(path))
        heads = from_vllm(tensors, config, source=str(directory))
    else:
        path = directory / MEDUSA_WEIGHTS_FILE
        if not path.is_file():
            path = directory / MEDUSA_PICKLE_FILE
        vocab = base_weight.shape[0] if base_weight is not None else None
        heads = from_medusa(read_tensors(path), config, vocab_size=vocab, source=str(directory))
    if base is not None:
        heads = _unshare_if_not_base(heads, base_weight, str(directory))
        check_heads_match_base(heads, base, source=str(directory), allow_other_base=allow_other_base)
    return heads


def _unshare_if_not_base(heads: MedusaHeads, base_weight: torch.Tensor, source: str) -> MedusaHeads:
    """A shared projection read from the checkpoint that is not this base's lm_head stays the
    checkpoint's: give every head its own copy instead of silently swapping in the base's."""
    shared = heads.shared_weight
    if not heads.config.shared_lm_head or shared is None or tuple(shared.shape) != tuple(base_weight.shape):
        return heads
    rows = slice(None) if heads.token_map is None else heads.token_map.cpu()  # a widened export: the mapped rows
    if torch.equal(shared.to(base_weight.dtype).cpu()[rows], base_weight.detach().cpu()[rows]):
        return heads
    warnings.warn(f"{source}: the checkpoint's shared lm_head differs from the base model's; each head gets a copy",
                  FormatWarning, stacklevel=3)
    config = heads.config
    owned = MedusaHeads(config.hidden_size, config.vocab_size, config.num_heads, config.num_layers,
                        head_vocab_size=None if heads.token_map is None else config.head_vocab_size,
                        base_model=config.base_model)
    owned.config.base_fingerprint, owned.config.extra = config.base_fingerprint, config.extra
    state = dict(heads.state_dict())
    for k in range(config.num_heads):
        state[f"heads.{k}.lm_head.weight"] = shared
    owned.load_state_dict(state, strict=True)
    return owned
