"""`medusaforge export`: write trained heads in a serving engine's layout, with a model card.

  medusaforge export --heads runs/demo/heads --format vllm --out runs/demo/heads-vllm
  medusaforge export --heads runs/demo/heads --format medusa --out runs/demo/heads-medusa --eval-json runs/demo/eval.json
  medusaforge export --heads runs/eagle3 --out runs/eagle3-export --model smollm2   # an EAGLE-3 draft: its one layout

An EAGLE-3 folder (train --method eagle3's OUT or OUT/draft, SpecForge's) is recognised by itself and
written in the layout SpecForge produces and vLLM and SGLang load (interop/eagle3_layout.py).

The conversion itself is interop.layouts.to_vllm / to_medusa; this file loads (any layout, through
interop.importer.import_heads), writes through medusaforge.files (a staging folder that replaces
--out only when complete) and never replaces a non-empty folder without --overwrite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from medusaforge.config import dtype_option, option
from medusaforge.interop.eagle3_layout import find_eagle3_folder
from medusaforge.drafters.medusa_heads import CONFIG_FILE, MedusaHeads
from medusaforge.files import atomic_write_text, refuse_non_empty, staging_directory
from medusaforge.interop import layouts as formats
from medusaforge.interop.full_vocab import top1_agreement
from medusaforge.interop.importer import import_heads
from medusaforge.interop.model_card import model_card, read_eval_json

EAGLE3 = "eagle3"  # the one layout of EAGLE-3 drafts, chosen by itself when --heads is an EAGLE-3 folder
# "auto" keeps the heads' own dtype.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportConfig:
    """Export heads to vLLM's layout or the original Medusa layout, with a README.md model card."""

    heads: str = option("", "heads folder to export (medusaforge, vLLM or original-Medusa layout)")
    format: str = option("vllm", "target layout: vllm, or medusa (FasterDecoding's original layout, which vLLM "
                                 "also reads and TensorRT-LLM's removed converter read)", choices=[*formats.FORMATS, EAGLE3])
    out: str = option("", "output folder; refused if it exists and is not empty, unless --overwrite")
    overwrite: bool = option(False, "replace a non-empty --out folder")
    model: str = option("", "base model (built-in name, folder or hub id); checks the heads fit it, and is needed for "
                            "shared-lm_head heads (default then: the heads' base_model)")
    allow_other_base: bool = option(False, "accept --model even if its weights differ from those the heads were trained on")
    base_model_id: str = option("", "base model name written into config.json and the model card "
                                    "(default: the heads' base_model)")
    eval_json: str = option("", "JSON from `medusaforge eval`; accept_length, speedup, ... go into the model card")
    data: str = option("", "training data described in the model card (default: what the heads' config records)")
    dtype: str = dtype_option("auto", "dtype of the written tensors (auto: the heads' own)")
    write_pt: bool = option(False, "format medusa: also write medusa_lm_head.pt, for FasterDecoding's own code and "
                                   "older TensorRT-LLM releases, which read only the pickle")
    num_speculative_tokens: int = option(0, "K in the model card's vLLM command (0: one per head)")
    hidden_cache: str = option("", "a `medusaforge cache` folder of the base's real hidden states: when the layout forces "
                                   "truncated heads onto the full vocabulary, measure on it how often each head's top-1 "
                                   "is kept (printed and written into the model card)")
    check_tokens: int = option(20000, "at most this many assistant-token hidden states are read for --hidden-cache")

    def validate(self) -> None:
        if not self.heads:
            raise ValueError("--heads is required")
        if not self.out:
            raise ValueError("--out is required")
        if self.write_pt and self.format != formats.MEDUSA:
            raise ValueError("--write-pt only applies to --format medusa")
        if self.num_speculative_tokens < 0:
            raise ValueError("--num-speculative-tokens must be >= 0")
        if self.check_tokens < 1:
            raise ValueError("--check-tokens must be >= 1")


def run(config: ExportConfig) -> Path:
    eagle3 = find_eagle3_folder(config.heads)
    if eagle3 is not None or config.format == EAGLE3:
        return _export_eagle3(config, eagle3)
    out = Path(config.out)
    _check_output(out, Path(config.heads), config.overwrite)
    heads = import_heads(config.heads)
    base_weight = None
    if config.model or heads.config.shared_lm_head:
        base_weight, heads = _base_lm_head(config, heads)
    if config.num_speculative_tokens > heads.num_heads:
        raise ValueError(f"--num-speculative-tokens {config.num_speculative_tokens} > {heads.num_heads} heads")
    base_model_id = config.base_model_id or heads.config.base_model
    if config.format == formats.VLLM:
        tensors, engine_config = formats.to_vllm(heads, base_weight)
        weights_file = formats.VLLM_WEIGHTS_FILE
    else:
        tensors, engine_config = formats.to_medusa(heads, base_weight, base_model_id)
        weights_file = formats.MEDUSA_WEIGHTS_FILE
    if config.dtype != "auto":
        tensors = {n: t.to(DTYPES[config.dtype]) if t.is_floating_point() else t for n, t in tensors.items()}
        engine_config["torch_dtype"] = str(DTYPES[config.dtype]).removeprefix("torch.")
    agreement = _agreement(config, heads, base_weight)
    if agreement is not None:
        engine_config[formats.PROVENANCE_KEY]["top1_agreement"] = agreement
    eval_results = read_eval_json(config.eval_json) if config.eval_json else None
    card = model_card(heads.config, config.format, str(out), base_model_id, eval_results, config.data,
                      config.num_speculative_tokens or None, agreement=agreement)
    _write_folder(out, {weights_file: tensors}, engine_config, card, write_pt=config.write_pt)
    names = sorted(p.name for p in out.iterdir())
    print(f"exported {heads.num_heads} heads ({config.format} layout) to {out}: {', '.join(names)}")
    return out


def _export_eagle3(config: ExportConfig, folder: Path | None) -> Path:
    """An EAGLE-3 draft: SpecForge's layout, which vLLM and SGLang both load (interop/eagle3_layout.py)."""
    from medusaforge.interop.eagle3_layout import convert_folder

    if folder is None:
        raise ValueError(f"--format eagle3: {config.heads} holds no EAGLE-3 draft (config.json with draft_vocab_size)")
    if config.format == formats.MEDUSA or config.write_pt:
        raise ValueError("an EAGLE-3 draft has one layout, read by vLLM and SGLang alike: drop --format medusa / --write-pt")
    base_layers = None
    if config.model:  # only its config is read: it checks that the feature layers exist in the base
        from transformers import AutoConfig

        from medusaforge.models import resolve_model_path

        base_layers = AutoConfig.from_pretrained(resolve_model_path(config.model)).get_text_config().num_hidden_layers
    eval_results = read_eval_json(config.eval_json) if config.eval_json else None
    out = convert_folder(folder, config.out, DTYPES.get(config.dtype), base_layers, config.base_model_id or config.model,
                         eval_results, config.data, config.overwrite)
    print(f"exported the EAGLE-3 draft (eagle3 layout) to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


def _agreement(config: ExportConfig, heads: MedusaHeads, base_weight: torch.Tensor | None) -> dict | None:
    """How often each head's top-1 survives the layout, on real hidden states; None when the layout
    is exact (no widening) or no --hidden-cache was given (then it says so)."""
    if not formats.widened(heads):
        return None
    fill = formats.FILL_FOR_FORMAT[config.format]
    if not config.hidden_cache:
        print(f"note: the {config.format} layout widens these truncated heads to the full vocabulary ({fill} rows); "
              "pass --hidden-cache to measure how often each head's top-1 is kept")
        return None
    hidden = _cache_hidden_states(config.hidden_cache, config.check_tokens)
    rows = formats.exported_rows(heads, config.format, base_weight)
    if config.dtype != "auto":
        rows = [r.to(DTYPES[config.dtype]) for r in rows]
    per_head = []
    with torch.no_grad():
        for k in range(heads.num_heads):
            transformed = heads.transform(hidden.to(heads.projection_weight(k).dtype), k)
            per_head.append(top1_agreement(transformed, heads.projection_weight(k), heads.token_map, rows[k]))
    shown = ", ".join(f"head {k} {100 * a:.2f}%" for k, a in enumerate(per_head))
    print(f"top-1 kept by the {fill}-filled full-vocabulary rows on {len(hidden)} real hidden states: {shown}")
    return {"fill": fill, "per_head": per_head, "num_tokens": len(hidden), "hidden_cache": str(config.hidden_cache)}


def _cache_hidden_states(directory: str, max_tokens: int) -> torch.Tensor:
    """[N <= max_tokens, hidden] float32 hidden states at assistant tokens (where heads draft), from
    examples spread evenly over the cache."""
    from medusaforge.training.hidden_cache import HiddenCache

    cache = HiddenCache(directory)
    stride = max(1, len(cache) // 256)
    parts, count = [], 0
    for index in range(0, len(cache), stride):
        _, mask = cache.data.example(index)
        states = cache.hidden(index)[mask.bool()].float()
        parts.append(states)
        count += len(states)
        if count >= max_tokens:
            break
    if not parts:
        raise ValueError(f"{directory}: the hidden-state cache holds no examples")
    return torch.cat(parts)[:max_tokens]


def _check_output(out: Path, heads_dir: Path, overwrite: bool) -> None:
    if out.exists() and heads_dir.exists() and out.resolve() == heads_dir.resolve():
        raise ValueError("--out is the --heads folder; export to a new folder")
    refuse_non_empty(out, overwrite)


def _base_lm_head(config: ExportConfig, heads: MedusaHeads) -> tuple[torch.Tensor, MedusaHeads]:
    """Load the base model, re-load the heads against it (shape and fingerprint checks), return its lm_head."""
    from medusaforge.models import lm_head_of, load_base_model

    model = config.model or heads.config.base_model
    if not model:
        raise ValueError("these heads need the base model's lm_head for this export and record no base_model: pass --model")
    base = load_base_model(model, check=False)
    heads = import_heads(config.heads, base, allow_other_base=config.allow_other_base)
    return lm_head_of(base).weight.detach(), heads


def _write_folder(out: Path, weight_files: dict, engine_config: dict, card: str, write_pt: bool) -> None:
    with staging_directory(out) as staging:
        for name, tensors in weight_files.items():
            # "format: pt" is the metadata transformers-style loaders look for in safetensors files.
            save_file(tensors, str(staging / name), metadata={"format": "pt"})
            if write_pt:
                torch.save(tensors, staging / formats.MEDUSA_PICKLE_FILE)
        atomic_write_text(staging / CONFIG_FILE, json.dumps(engine_config, indent=2) + "\n")
        atomic_write_text(staging / "README.md", card)
