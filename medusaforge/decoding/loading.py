"""Loading for decoding: the base model, its tokenizer, the drafter, its tree and its stop tokens."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medusaforge.decoding.adaptive import AdaptiveDrafting
from medusaforge.decoding.cost import StepCost
from medusaforge.decoding.decoder import DecodeResult, eagle3_generate, medusa_generate
from medusaforge.decoding.tree import default_tree, load_tree, load_tree_metadata
from medusaforge.drafters.eagle3_proposer import DynamicTree, Eagle3Proposer, prepare_draft
from medusaforge.drafters.lookup import LookupProposer
from medusaforge.drafters.medusa_proposer import prepare_heads
from medusaforge.files import read_json
from medusaforge.interop.eagle3_layout import find_eagle3_folder, import_eagle3
from medusaforge.interop.importer import import_heads
from medusaforge.models import load_base_model, load_tokenizer, resolve_device, resolve_dtype


def heads_folder(path: Path) -> Path:
    """Accept a `train --out` folder as well as its heads/ subfolder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "heads" / "config.json").is_file():
        return path / "heads"
    return path


def load_for_decoding(model: str, heads: Path, dtype: str, device: str, allow_other_base: bool = False):
    """-> (tokenizer, base, heads) ready for medusa_generate, all on one device and dtype."""
    torch_dtype = resolve_dtype(dtype, resolve_device(device))
    tokenizer = load_tokenizer(model)
    base = load_base_model(model, dtype=torch_dtype, device=resolve_device(device))
    loaded = import_heads(heads_folder(heads), base, allow_other_base=allow_other_base)
    return tokenizer, base, prepare_heads(loaded, base)


def stop_token_ids(tokenizer, base) -> list[int]:
    """EOS of the tokenizer and of the model's generation config (which may hold several)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(int(t) for t in (configured if isinstance(configured, (list, tuple)) else [configured]))
    return sorted(ids)


def pick_tree(tree: Path | None, num_heads: int) -> list[list[int]]:
    """The tree file if given, else the shipped default. [] (from `medusaforge tree`) means plain decoding."""
    return load_tree(tree) if tree is not None else default_tree(num_heads)


def adaptive_drafting(tree: Path | None, enabled: bool = True, dtype: torch.dtype | None = None) -> AdaptiveDrafting | None:
    """The adaptive drafting rule for a decode run, or None when turned off. A tree file written by
    `medusaforge tree` carries its fitted step cost; without one, or when it was timed in another
    dtype than `dtype` (the one decoding now), the decoder times its own steps: in fp32 a tree pass
    costs far more against a plain step than in bf16, and bf16's costs would keep a losing draft on."""
    if not enabled:
        return None
    metadata = load_tree_metadata(tree) if tree is not None else {}
    timed_in, decoding_in = metadata.get("dtype"), str(dtype).removeprefix("torch.")
    if dtype is not None and timed_in and timed_in != decoding_in:
        print(f"adaptive drafting: {tree} was timed in {timed_in}, decoding runs in {decoding_in}: "
              "timing this run's own steps instead", file=sys.stderr)
        return AdaptiveDrafting()
    step_cost, plain_ms = metadata.get("step_cost"), metadata.get("plain_step_ms")
    if isinstance(step_cost, dict) and plain_ms:
        cost = StepCost(step_cost["fixed_ms"] / 1000, step_cost["per_node_ms"] / 1000)
        return AdaptiveDrafting(cost, plain_ms / 1000)
    return AdaptiveDrafting()


def hf_greedy(base, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int]) -> list[int]:
    """transformers' own greedy decoding of one [T] prompt: the reference every decoder must equal."""
    output = base.generate(
        input_ids[None],
        attention_mask=torch.ones_like(input_ids[None]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0] if eos else 0,
    )
    return output[0, len(input_ids) :].tolist()


def hf_prompt_lookup(base, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int], num_tokens: int = 10) -> list[int]:
    """transformers' prompt-lookup decoding (n-gram candidates from the context), greedy."""
    output = base.generate(
        input_ids[None], attention_mask=torch.ones_like(input_ids[None]), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=eos, pad_token_id=eos[0] if eos else 0, prompt_lookup_num_tokens=num_tokens,
    )
    return output[0, len(input_ids) :].tolist()


def load_eagle3_proposer(directory: str | os.PathLike, base: nn.Module, tree: DynamicTree | None = None) -> Eagle3Proposer:
    """An EAGLE-3 folder (ours or SpecForge's layout) -> a proposer ready for `base`."""
    base_layers = base.config.get_text_config().num_hidden_layers
    draft = import_eagle3(directory, base.get_input_embeddings(), base_num_layers=base_layers)
    return Eagle3Proposer(prepare_draft(draft, base), tree)


def load_eagle3_for_decoding(model: str, drafter: str | os.PathLike, dtype: str, device: str, tree: DynamicTree | None = None):
    """-> (tokenizer, base, proposer) for `speculative_generate`, all on one device and dtype."""
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(model)
    base = load_base_model(model, dtype=resolve_dtype(dtype, torch_device), device=torch_device)
    return tokenizer, base, load_eagle3_proposer(drafter, base, tree)


FITTED_TREE_FILE = "tree.json"  # `medusaforge tree ... --out DIR/tree.json` leaves the fitted tree here


def fitted_tree_file(drafter: str | os.PathLike, tree_file: str | os.PathLike | None = None) -> Path | None:
    """The tree file that generate and eval decode with: `tree_file` when given, else the one a tree
    search left in the drafter's folder, else None (the default tree, or the --eagle-* shape). The
    folder is the heads folder itself (retraining replaces it, and a stale tree with it), or an
    EAGLE-3 folder and then its draft/ subfolder. The fitted shape is this host's best, so it wins
    over the defaults."""
    if tree_file is not None:
        return Path(tree_file)
    found = find_eagle3_folder(drafter)
    folders = [Path(drafter), found] if found is not None else [heads_folder(Path(drafter))]
    for folder in folders:
        if (folder / FITTED_TREE_FILE).is_file():
            print(f"tree: {folder / FITTED_TREE_FILE} (fitted by `medusaforge tree`; --tree FILE overrides it)")
            return folder / FITTED_TREE_FILE
    return None


def load_eagle_tree(path: str | os.PathLike) -> DynamicTree | None:
    """The tree a search chose; None when it found that no draft beats plain decoding."""
    raw = read_json(path, "tree file")
    if not isinstance(raw, dict) or "eagle" not in raw:
        raise ValueError(f"{path}: not an EAGLE-3 tree file (no 'eagle' key); Medusa path trees do not apply to EAGLE-3")
    chosen = raw["eagle"]
    if chosen is None:
        return None
    try:
        return DynamicTree(int(chosen["topk"]), int(chosen["depth"]), int(chosen["num_nodes"]))
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: 'eagle' needs topk, depth and num_nodes ({error})") from None


@dataclass
class LoadedDrafter:
    """What generate and eval decode with: the base, its tokenizer and one drafter, either Medusa
    heads on a path tree ([]: the tree file found no draft worth its cost) or an EAGLE-3 proposer on
    its dynamic tree (both None for that same verdict)."""

    tokenizer: object
    base: nn.Module
    tree_file: Path | None  # the fitted tree file decoding reads, None for the defaults
    heads: nn.Module | None = None
    tree: list[list[int]] | None = None
    eagle3: Eagle3Proposer | None = None
    eagle_tree: DynamicTree | None = None

    @property
    def is_eagle3(self) -> bool:
        return self.heads is None

    @property
    def drafts(self) -> bool:
        return bool(self.eagle_tree if self.is_eagle3 else self.tree)

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, eos: list[int], lookup: LookupProposer | None = None,
                 adaptive: AdaptiveDrafting | None = None, temperature: float = 0.0, typical_epsilon: float = 0.09,
                 typical_alpha: float = 0.3, generator: torch.Generator | None = None) -> DecodeResult:
        """Sampling uses speculative sampling with EAGLE-3 and typical acceptance with heads."""
        if self.is_eagle3:
            return eagle3_generate(self.base, self.eagle3, input_ids, max_new_tokens, eos, temperature=temperature,
                                   generator=generator, adaptive=adaptive, lookup=lookup)
        return medusa_generate(self.base, self.heads, input_ids, max_new_tokens, eos, self.tree, temperature=temperature,
                               typical_epsilon=typical_epsilon, typical_alpha=typical_alpha, generator=generator,
                               adaptive=adaptive, lookup=lookup)


def load_drafter(model: str, drafter: str | os.PathLike, tree_file: str | os.PathLike | None, eagle_shape: DynamicTree,
                 dtype: str, device: str, allow_other_base: bool = False) -> LoadedDrafter:
    """generate's and eval's set-up. `drafter` is a heads folder or an EAGLE-3 folder; the tree is
    `tree_file`, else the one `medusaforge tree` left in the drafter's folder, else the shipped tree
    for the heads or `eagle_shape` for an EAGLE-3 draft."""
    eagle3 = find_eagle3_folder(drafter)
    tree_file = fitted_tree_file(drafter, tree_file)
    if eagle3 is not None:
        # None when `medusaforge tree --drafter` found that no draft beats a plain step
        eagle_tree = load_eagle_tree(tree_file) if tree_file else eagle_shape
        tokenizer, base, proposer = load_eagle3_for_decoding(model, eagle3, dtype, device, eagle_tree)
        return LoadedDrafter(tokenizer, base, tree_file, eagle3=proposer if eagle_tree is not None else None, eagle_tree=eagle_tree)
    tokenizer, base, heads = load_for_decoding(model, drafter, dtype, device, allow_other_base)
    return LoadedDrafter(tokenizer, base, tree_file, heads=heads, tree=pick_tree(tree_file, heads.num_heads))
