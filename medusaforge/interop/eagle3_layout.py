"""EAGLE-3 drafts in the checkpoint layout SpecForge writes and vLLM and SGLang load; and back.

Read from the loaders themselves (tests/test_eagle3_layout.py replays their key and shape rules):
  vLLM   vllm/model_executor/models/llama_eagle3.py (Eagle3LlamaForCausalLM.load_weights,
         LlamaModel.load_weights), vllm/model_executor/models/registry.py
         ("LlamaForCausalLMEagle3" -> Eagle3LlamaForCausalLM), and
         vllm/v1/worker/gpu/spec_decode/eagle/eagle3_utils.py (get_eagle3_aux_layers_from_config)
  SGLang python/sglang/srt/models/llama_eagle3.py (LlamaForCausalLMEagle3.load_weights),
         python/sglang/srt/models/llama.py (set_eagle3_layers_to_capture), and
         model_runner.py (reads eagle_config["eagle_aux_hidden_state_layer_ids"])
  SpecForge specforge/modeling/draft/llama3_eagle.py (the module names) and its trainer, which
         saves the draft's state_dict without embed_tokens ("embed" not in k.lower())

The folder: config.json (a LlamaConfig, architectures ["LlamaForCausalLMEagle3"], num_hidden_layers
1, vocab_size = the base's, draft_vocab_size, tie_word_embeddings false) and model.safetensors with
fc.weight, midlayer.*, norm.weight, lm_head.weight, d2t (int64) and t2d (bool). No embed_tokens:
vLLM skips it when absent and SGLang replaces it by the target's, so both use the base embedding.

NOTE for drafters/eagle3.py (E2 -> E1, checked against the loaders above):
  * parameter names and shapes: identical to what both loaders read; nothing to rename.
  * the residual is the un-normed hidden input, the fed-back hidden is the pre-norm layer output:
    as vLLM's default (norm_before_residual false) and SGLang's. Matches eagle3.py.
  * a full-vocabulary draft is written without d2t / t2d: vLLM 0.32 (installed in .venv-vllm) makes
    its draft_id_to_target_id parameter only when draft_vocab_size != the target's vocabulary size,
    and its weight loader refuses a d2t it has no parameter for.
  * vLLM 0.32's gpu_model_runner reads the nested eagle_config ids as-is when the top-level key is
    missing: one layer off from SGLang's reading of the same key. Writing the top-level key avoids it.
  * the two engines number the feature layers differently, and neither as eagle3.py's config does:
      vLLM reads the top-level `eagle_aux_hidden_state_layer_ids` and captures the residual stream
      *entering* layer j, which is HF output_hidden_states[j]: same numbers as eagle3.py.
      SGLang (and SpecForge) read `eagle_config.eagle_aux_hidden_state_layer_ids` as the *output*
      of layer j and add 1 (llama.py: layers_to_capture = [val + 1 for val in layer_ids]).
    eagle3.py keeps HF indices under eagle_config, so its own config.json would make SGLang read
    every layer one too deep. This export writes both keys, each in its engine's numbering, and the
    import reads them back to HF indices. Both engines capture only before a layer runs, so an HF
    index must be < the base's layer count (HF's last entry, post-norm, is never available).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medusaforge.files import refuse_non_empty, staging_directory

ARCHITECTURE = "LlamaForCausalLMEagle3"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
# Llama fields both engines read from the draft's config.json, copied from the draft's config.
LLAMA_FIELDS = (
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "hidden_act", "rms_norm_eps", "max_position_embeddings", "vocab_size", "bos_token_id", "eos_token_id",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- feature-layer numbering ------------------------------------------------------------------


def vllm_layer_ids(hf_indices) -> list[int]:
    """HF output_hidden_states indices -> vLLM's eagle_aux_hidden_state_layer_ids (the same)."""
    return [int(i) for i in hf_indices]


def sglang_layer_ids(hf_indices) -> list[int]:
    """HF indices -> SpecForge/SGLang eagle_config ids (output of layer id; SGLang adds 1 back)."""
    return [int(i) - 1 for i in hf_indices]


def check_capturable(hf_indices, base_num_layers: int) -> None:
    bad = [int(i) for i in hf_indices if not 0 <= int(i) < base_num_layers]
    if bad:
        raise ValueError(
            f"feature layers {list(hf_indices)}: {bad} cannot be captured by vLLM or SGLang, which read the "
            f"residual stream before one of the base's {base_num_layers} layers (HF indices 0..{base_num_layers - 1})"
        )


def feature_layers_of(config: dict, path: str = CONFIG_FILE, base_num_layers: int | None = None) -> list[int]:
    """HF indices from an engine config: vLLM's key first, then SpecForge's nested one, then the
    engines' default (2, L//2, L-3), which needs the base's layer count."""
    if config.get("eagle_aux_hidden_state_layer_ids"):
        return [int(i) for i in config["eagle_aux_hidden_state_layer_ids"]]
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if nested:
        return [int(i) + 1 for i in nested]
    if base_num_layers is None:
        raise ValueError(
            f"{path}: no eagle_aux_hidden_state_layer_ids; the engines then use (2, L//2, L-3) of the base's "
            "L layers: pass the base model so L is known"
        )
    return [2, base_num_layers // 2, base_num_layers - 3]


# ---- export -----------------------------------------------------------------------------------


def engine_config(draft_config, dtype: torch.dtype, base_num_layers: int | None = None, extra: dict | None = None) -> dict:
    """config.json for the engines from the draft's LlamaConfig (eagle3.py's, HF-indexed layers)."""
    hf_indices = list(draft_config.eagle_config["eagle_aux_hidden_state_layer_ids"])
    if base_num_layers is not None:
        check_capturable(hf_indices, base_num_layers)
    rope = dict(draft_config.rope_parameters)
    config = {"architectures": [ARCHITECTURE], "model_type": "llama", "num_hidden_layers": 1}
    config.update({field: getattr(draft_config, field) for field in LLAMA_FIELDS if getattr(draft_config, field, None) is not None})
    config.update(
        draft_vocab_size=int(draft_config.draft_vocab_size),
        target_hidden_size=int(getattr(draft_config, "target_hidden_size", draft_config.hidden_size)),
        # SGLang ties lm_head to embed_tokens when this is true; the draft head has its own rows.
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        # rope_theta / rope_scaling for loaders on transformers 4, rope_parameters for 5; kept
        # consistent, since transformers 5 lets a legacy rope_scaling override rope_parameters.
        rope_theta=rope["rope_theta"],
        rope_scaling=None if rope.get("rope_type", "default") == "default" else {k: v for k, v in rope.items() if k != "rope_theta"},
        rope_parameters=rope,
        eagle_aux_hidden_state_layer_ids=vllm_layer_ids(hf_indices),
        eagle_config={"eagle_aux_hidden_state_layer_ids": sglang_layer_ids(hf_indices), "use_aux_hidden_state": True},
        torch_dtype=str(dtype).removeprefix("torch."),
        use_cache=True,
    )
    if extra:
        config["medusaforge"] = extra
    return config


def engine_tensors(draft: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The draft's state_dict as the checkpoint keys (already the engines' names); floating
    tensors cast to `dtype` if given, d2t / t2d kept int64 / bool."""
    tensors = {}
    for name, tensor in draft.state_dict().items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[name] = tensor.contiguous()
    if len(tensors["d2t"]) == len(tensors["t2d"]):
        # A full-vocabulary draft: vLLM 0.32 has no draft_id_to_target_id parameter then and refuses a
        # d2t tensor, so the maps are left out (SGLang and our import read that as the identity).
        # Rows in another order are put in base-id order first: logits[target] = logits[draft].
        targets = torch.arange(len(tensors["d2t"])) + tensors.pop("d2t")
        tensors.pop("t2d")
        order = torch.empty_like(targets)
        order[targets] = torch.arange(len(targets))
        tensors["lm_head.weight"] = tensors["lm_head.weight"][order].contiguous()
    return tensors


def write_layout(out: str | os.PathLike, tensors: dict, config: dict, card: str = "", overwrite: bool = False) -> Path:
    """Write the folder atomically (a staging folder renamed into place)."""
    out = Path(out)
    refuse_non_empty(out, overwrite)
    with staging_directory(out) as staging:  # the folder's rename is the atomic step
        # "format: pt" is what transformers-style loaders look for in the metadata.
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if card:
            (staging / CARD_FILE).write_text(card)
    return out


def export_eagle3(
    draft: nn.Module,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    base_num_layers: int | None = None,
    card: str = "",
    overwrite: bool = False,
    extra: dict | None = None,
) -> Path:
    tensors = engine_tensors(draft, dtype)
    written_dtype = dtype or draft.fc.weight.dtype
    return write_layout(out, tensors, engine_config(draft.config, written_dtype, base_num_layers, extra), card, overwrite)


# ---- import -----------------------------------------------------------------------------------


def read_layout(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, tensors) of an EAGLE-3 folder, with clear errors; safetensors only."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{config_path}: not found; an EAGLE-3 folder has config.json and model.safetensors") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    if not weights_path.is_file():
        if (directory / "pytorch_model.bin").exists():
            raise ValueError(f"{directory}: only pytorch_model.bin (a pickle); medusaforge loads safetensors only")
        raise FileNotFoundError(f"{weights_path}: not found")
    return config, load_file(str(weights_path))


def is_eagle3_folder(directory: str | os.PathLike) -> bool:
    """True for a folder whose config.json names an EAGLE-3 draft (ours, SpecForge's or vLLM's name)."""
    try:
        config = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(config, dict):
        return False
    architectures = config.get("architectures") or []
    return any(a in (ARCHITECTURE, "Eagle3LlamaForCausalLM") for a in architectures) or "draft_vocab_size" in config


def check_vocab_maps(d2t: torch.Tensor, t2d: torch.Tensor, path: str) -> None:
    """d2t must send draft ids to distinct base ids, exactly the ones t2d marks."""
    targets = torch.arange(len(d2t)) + d2t
    if targets.min() < 0 or targets.max() >= len(t2d):
        raise ValueError(f"{path}: d2t sends draft ids outside the base vocabulary [0, {len(t2d)})")
    if len(torch.unique(targets)) != len(targets):
        raise ValueError(f"{path}: d2t sends two draft ids to the same base token")
    expected = torch.zeros_like(t2d)
    expected[targets] = True
    if not torch.equal(expected, t2d):
        raise ValueError(f"{path}: t2d does not mark exactly the base tokens d2t maps to")


def draft_config_from_layout(config: dict, base_num_layers: int | None = None, path: str = CONFIG_FILE):
    """The LlamaConfig eagle3.py builds its draft from (HF-indexed feature layers under eagle_config)."""
    from transformers import LlamaConfig

    missing = [k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {missing}; not an EAGLE-3 draft config")
    if int(config.get("num_hidden_layers", 1)) != 1:
        raise ValueError(f"{path}: num_hidden_layers {config['num_hidden_layers']}; medusaforge's EAGLE-3 draft has one layer")
    fields = {k: config[k] for k in LLAMA_FIELDS if config.get(k) is not None}
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = dict(config.get("rope_scaling") or {"rope_type": "default"})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        rope["rope_theta"] = config.get("rope_theta", 10000.0)
    draft_config = LlamaConfig(**fields, num_hidden_layers=1, tie_word_embeddings=False, attention_bias=False,
                               mlp_bias=False, rope_parameters=rope)
    draft_config.architectures = [ARCHITECTURE]
    draft_config.draft_vocab_size = int(config.get("draft_vocab_size") or config["vocab_size"])
    draft_config.target_hidden_size = int(config.get("target_hidden_size", config["hidden_size"]))
    layers = feature_layers_of(config, path, base_num_layers)
    # Any HF index works for medusaforge's own decoder (the last one is HF's post-norm output);
    # only the export needs indices the engines capture (engine_config checks that).
    if base_num_layers is not None and not all(0 <= i <= base_num_layers for i in layers):
        raise ValueError(f"{path}: feature layers {layers} are not hidden_states indices of a {base_num_layers}-layer base")
    draft_config.eagle_config = {"eagle_aux_hidden_state_layer_ids": layers}
    return draft_config


def import_eagle3(directory: str | os.PathLike, embed_tokens: nn.Embedding, base_num_layers: int | None = None):
    """An EAGLE-3 folder (ours, SpecForge's) -> eagle3.Eagle3Draft with exactly the stored tensors.
    A stored embed_tokens is ignored: the draft always reads the base's (as the engines do)."""
    from medusaforge.drafters.eagle3 import Eagle3Draft

    path = str(Path(directory) / WEIGHTS_FILE)
    config, tensors = read_layout(directory)
    draft_config = draft_config_from_layout(config, base_num_layers, str(Path(directory) / CONFIG_FILE))
    draft = Eagle3Draft(draft_config, embed_tokens)
    expected = draft.state_dict()
    tensors = {k: v for k, v in tensors.items() if "embed_tokens" not in k}
    if "d2t" not in tensors and draft_config.draft_vocab_size == draft_config.vocab_size:
        tensors["d2t"], tensors["t2d"] = expected["d2t"], expected["t2d"]  # a full-vocabulary draft
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}; config.json implies {list(expected[name].shape)}")
    check_vocab_maps(tensors["d2t"], tensors["t2d"], path)
    # Load in the stored dtype so the round trip is bit for bit; callers move it where they decode.
    dtype = tensors["fc.weight"].dtype
    draft.to(dtype)
    draft.load_state_dict(tensors)
    return draft


def convert_folder(
    source: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype | None = None,
    base_num_layers: int | None = None,
    base_model_id: str = "",
    eval_results: dict | None = None,
    data: str = "",
    overwrite: bool = False,
) -> Path:
    """Any EAGLE-3 folder (train's OUT/draft, an export, SpecForge's) -> the engine layout with a card."""
    from medusaforge.interop.eagle3_card import eagle3_card

    if Path(out).exists() and Path(source).exists() and Path(out).resolve() == Path(source).resolve():
        raise ValueError(f"--out {out} is the draft folder itself; export to a new folder")
    draft = import_eagle3(source, embed_tokens=None, base_num_layers=base_num_layers)  # export needs no embedding
    extra = {"base_model": base_model_id} if base_model_id else None
    config = engine_config(draft.config, dtype or draft.fc.weight.dtype, base_num_layers, extra)
    card = eagle3_card(config, str(out), base_model_id, eval_results, data)
    return write_layout(out, engine_tensors(draft, dtype), config, card, overwrite)


def find_eagle3_folder(path: str | os.PathLike | None):
    """The EAGLE-3 folder at `path` or in its draft/ subfolder (a `train --method eagle3` output), else None."""
    if path is None:
        return None
    for folder in (Path(path), Path(path) / "draft"):
        if is_eagle3_folder(folder):
            return folder
    return None
