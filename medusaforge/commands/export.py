"""`medusaforge export`: write trained heads in a serving engine's layout, with a model card.

  medusaforge export --heads runs/demo/heads --format vllm --out runs/demo/heads-vllm
  medusaforge export --heads runs/demo/heads --format medusa --out runs/demo/heads-medusa --eval-json runs/demo/eval.json

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

from medusaforge.interop import layouts as formats
from medusaforge.config import option
from medusaforge.drafters.medusa_heads import CONFIG_FILE, MedusaHeads
from medusaforge.files import atomic_write_text, refuse_non_empty, staging_directory
from medusaforge.interop.importer import import_heads
from medusaforge.interop.model_card import model_card, read_eval_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """Export heads to vLLM's layout or the original Medusa layout (read by TensorRT-LLM), with a README.md model card."""

    heads: str = option("", "heads folder to export (medusaforge, vLLM or original-Medusa layout)")
    format: str = option("vllm", "target layout: vllm, or medusa (FasterDecoding's, which TensorRT-LLM converts)",
                         choices=list(formats.FORMATS))
    out: str = option("", "output folder; refused if it exists and is not empty, unless --overwrite")
    overwrite: bool = option(False, "replace a non-empty --out folder")
    expand_vocab: bool = option(False, "format medusa: write truncated-vocabulary heads as full-vocabulary "
                                       "projections, rows outside the token map copied from the base lm_head")
    model: str = option("", "base model (built-in name, folder or hub id); checks the heads fit it, and is needed for "
                            "shared-lm_head heads and --expand-vocab (default then: the heads' base_model)")
    allow_other_base: bool = option(False, "accept --model even if its weights differ from those the heads were trained on")
    base_model_id: str = option("", "base model name written into config.json and the model card "
                                    "(default: the heads' base_model)")
    eval_json: str = option("", "JSON from `medusaforge eval`; accept_length, speedup, ... go into the model card")
    data: str = option("", "training data described in the model card (default: what the heads' config records)")
    dtype: str = option("keep", "dtype of the written tensors: keep, float32, bfloat16 or float16",
                        choices=["keep", *DTYPES])
    write_pt: bool = option(False, "format medusa: also write medusa_lm_head.pt, for FasterDecoding's own code and "
                                   "older TensorRT-LLM releases, which read only the pickle")
    num_speculative_tokens: int = option(0, "K in the model card's vLLM command (0: one per head)")

    def validate(self) -> None:
        if not self.heads:
            raise ValueError("--heads is required")
        if not self.out:
            raise ValueError("--out is required")
        if self.write_pt and self.format != formats.MEDUSA:
            raise ValueError("--write-pt only applies to --format medusa")
        if self.num_speculative_tokens < 0:
            raise ValueError("--num-speculative-tokens must be >= 0")


def run(config: ExportConfig) -> Path:
    out = Path(config.out)
    _check_output(out, Path(config.heads), config.overwrite)
    heads = import_heads(config.heads)
    base_weight = None
    if config.model or heads.config.shared_lm_head or (config.expand_vocab and heads.token_map is not None):
        base_weight, heads = _base_lm_head(config, heads)
    if config.num_speculative_tokens > heads.num_heads:
        raise ValueError(f"--num-speculative-tokens {config.num_speculative_tokens} > {heads.num_heads} heads")
    base_model_id = config.base_model_id or heads.config.base_model
    if config.format == formats.VLLM:
        tensors, engine_config = formats.to_vllm(heads, base_weight)
        weight_files = {formats.VLLM_WEIGHTS_FILE: tensors}
    else:
        tensors, engine_config = formats.to_medusa(heads, base_weight, config.expand_vocab, base_model_id)
        weight_files = {formats.MEDUSA_WEIGHTS_FILE: tensors}
    if config.dtype != "keep":
        tensors = {n: t.to(DTYPES[config.dtype]) if t.is_floating_point() else t for n, t in tensors.items()}
        weight_files = {name: tensors for name in weight_files}
        engine_config["torch_dtype"] = config.dtype
    eval_results = read_eval_json(config.eval_json) if config.eval_json else None
    card = model_card(heads.config, config.format, str(out), base_model_id, eval_results, config.data,
                      config.num_speculative_tokens or None)
    _write_folder(out, weight_files, engine_config, card, write_pt=config.write_pt)
    names = sorted(p.name for p in out.iterdir())
    print(f"exported {heads.num_heads} heads ({config.format} layout) to {out}: {', '.join(names)}")
    return out


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
