"""What `train --plan` builds: the base from its config.json on the meta device (no weights are read
or allocated), the recipe's trainable part beside it, and the per-rank micro-batch of the recipe.

`--model` may be a folder holding only config.json (configs/models/...), a full local model folder,
a hub id already in the local hub cache, or the built-in SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.models import resolve_model_path, supports_bf16
from medusaforge.training.plan import FP32, GIB, LAYOUTS, BaseShape, PlanRow, Workload, plan_row, rank_sequences

SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent.parent / "configs" / "models"
CUDA_RUNTIME = 1 * GIB  # CUDA context and caching-allocator slack per process, outside tensors


def base_on_meta(model: str, trust_remote_code: bool = False) -> nn.Module:
    """The base model with every tensor on the meta device, from its config.json alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as error:
        shipped = ", ".join(sorted(str(p.relative_to(SHIPPED_CONFIGS.parent.parent)) for p in SHIPPED_CONFIGS.iterdir())) if SHIPPED_CONFIGS.is_dir() else ""
        raise ValueError(f"--model {model}: no local config.json to plan from ({error}); point --model at a folder "
                         f"holding the model's config.json (shipped: {shipped})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def base_shape(base: nn.Module) -> BaseShape:
    config = base.config.get_text_config()
    decoder = base.get_decoder()
    head, embed = base.get_output_embeddings(), base.get_input_embeddings()
    tied = head is not None and head.weight is embed.weight
    return BaseShape(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_heads=config.num_attention_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        vocab_size=config.vocab_size,
        total_params=sum(p.numel() for p in base.parameters()),
        layer_params=sum(p.numel() for p in decoder.layers[0].parameters()),
        lm_head_params=0 if tied else head.weight.numel(),
    )


def trainable_on_meta(recipe: str, config, base: nn.Module) -> nn.Module:
    """The recipe's trainable module, shaped as its setup builds it (training/setup.build_heads,
    training/eagle3.train_on), on the meta device."""
    shape = base_shape(base)
    with torch.device("meta"):
        if recipe == "medusa1":
            return MedusaHeads(shape.hidden_size, shape.vocab_size, config.num_heads, config.num_layers,
                               shared_lm_head=config.shared_lm_head, head_vocab_size=config.head_vocab)
        if recipe == "eagle3":
            draft_config = draft_config_from_base(base.config, min(config.draft_vocab, shape.vocab_size), config.feature_layers)
            return Eagle3Draft(draft_config, base.get_input_embeddings())
    raise ValueError(f"--plan covers the medusa1 and eagle3 recipes, not {recipe}")


def compute_bytes(config, device_type: str) -> int:
    """Bytes per value of the recipe's autocast dtype on the planned device (common.autocast_for)."""
    if config.dtype == "fp32":
        return FP32
    if config.dtype == "bf16" or device_type == "cuda":
        return 2
    return 2 if supports_bf16("cpu") else FP32


def global_sequences(config) -> int:
    """Sequences of full --max-length in one global micro-batch: --batch-size, or with a token budget
    (--batch-tokens, padded to the longest) as many full-length ones as fit: the worst case, since
    attention grows with the length."""
    batch_tokens = getattr(config, "batch_tokens", None)
    return max(1, batch_tokens // config.max_length) if batch_tokens else config.batch_size


def workload(recipe: str, config, shape: BaseShape, gpus: int, device_type: str) -> Workload:
    common = dict(recipe=recipe, sequences=rank_sequences(global_sequences(config), gpus), length=config.max_length,
                  compute=compute_bytes(config, device_type), online=config.cache is None,
                  chunk_size=getattr(config, "chunk_size", 512))
    if recipe == "eagle3":
        return Workload(**common, num_steps=config.num_steps, draft_vocab=min(config.draft_vocab, shape.vocab_size))
    head_vocab = 0 if config.shared_lm_head else (config.head_vocab or shape.vocab_size)
    return Workload(**common, num_heads=config.num_heads, num_layers=config.num_layers, head_vocab=head_vocab,
                    soft_targets=getattr(config, "soft_targets", 0.0) > 0)


def layouts_for(recipe: str, config, gpus: int) -> list[str]:
    """Layouts worth a row: one process has none; the base can be sharded only where the recipe offers
    --fsdp-base and the base runs (online)."""
    if gpus == 1:
        return ["single"]
    can_shard_base = hasattr(config, "fsdp_base") and config.cache is None
    return [layout for layout in LAYOUTS if can_shard_base or not layout.endswith("fsdp-base")]


def plan(recipe: str, config, gpu_counts: list[int]) -> tuple[BaseShape, int, list[PlanRow], str]:
    """-> (base shape, trainable parameters, one row per GPU count and layout, planned device type)."""
    base = base_on_meta(config.model, config.trust_remote_code)
    shape = base_shape(base)
    trainable = sum(p.numel() for p in trainable_on_meta(recipe, config, base).parameters() if p.requires_grad)
    device_type = "cpu" if config.device == "cpu" else "cuda"
    runtime = CUDA_RUNTIME if device_type == "cuda" else 0
    base_loaded = recipe == "eagle3" or config.cache is None  # offline Medusa reads only the lm_head
    rows = []
    for gpus in gpu_counts:
        work = workload(recipe, config, shape, gpus, device_type)
        for layout in layouts_for(recipe, config, gpus):
            rows.append(plan_row(shape, trainable, work, gpus, layout, base_loaded, runtime))
    return shape, trainable, rows, device_type
