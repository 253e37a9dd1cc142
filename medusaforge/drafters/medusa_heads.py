"""Medusa heads: K small residual MLPs on the base model's final hidden state.

Head k (0-based) predicts the token at position t+k+2 from the hidden state at t; the base
`lm_head` already predicts t+1. A head is `num_layers` ResBlocks, `x + SiLU(W x + b)` with W
zero-initialised, followed by a vocabulary projection initialised from the base `lm_head`. At
step 0 a head is therefore the base model's t+1 predictor applied to `x + SiLU(b)`: near it, not
an exact copy, because the bias keeps nn.Linear's random init (as in the original Medusa).

This module reads and writes only our own layout; `interop.importer.import_heads` is the one
entry point that reads any layout (ours, vLLM's, the original Medusa's).

Saved layout (a folder): `heads.safetensors` + `config.json`. Weight names:
  heads.{k}.blocks.{l}.linear.weight / .bias   [hidden, hidden] / [hidden]
  heads.{k}.lm_head.weight                     [head_vocab, hidden]   (absent with shared_lm_head)
  token_map                                    [head_vocab] int64     (only with a truncated vocabulary)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from medusaforge.files import atomic_write_text, staging_directory

HEADS_FILE = "heads.safetensors"
CONFIG_FILE = "config.json"
FORMAT_NAME = "medusaforge"


@dataclass
class HeadsConfig:
    hidden_size: int
    vocab_size: int
    num_heads: int = 4
    num_layers: int = 1
    base_model: str = ""
    # Hash of the base weights these heads were trained against (see models.base_fingerprint).
    base_fingerprint: str = ""
    # Each head reuses the frozen base lm_head instead of owning a projection (vLLM's original_lm_head).
    shared_lm_head: bool = False
    # Number of vocabulary rows each head projects to; equals vocab_size unless truncated.
    head_vocab_size: int | None = None
    format: str = FORMAT_NAME
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_vocab_size is None:
            self.head_vocab_size = self.vocab_size
        for name in ("hidden_size", "vocab_size", "num_heads", "num_layers", "head_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "num_layers" else 1):
                raise ValueError(f"heads config: {name} must be a positive integer, got {value!r}")


class ResBlock(nn.Module):
    """x + SiLU(W x + b). W starts at zero, so the block starts as the shift x + SiLU(b)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size, bias=True)
        nn.init.zeros_(self.linear.weight)
        # The bias keeps nn.Linear's default init, as in the original Medusa: SiLU(b) is a small
        # constant shift, and a zero W still gives every block its own gradient.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHead(nn.Module):
    def __init__(self, hidden_size: int, head_vocab_size: int, num_layers: int, with_lm_head: bool) -> None:
        super().__init__()
        # A fresh ResBlock per layer: `[ResBlock(h)] * n` would share one module n times.
        self.blocks = nn.ModuleList(ResBlock(hidden_size) for _ in range(num_layers))
        self.lm_head = nn.Linear(hidden_size, head_vocab_size, bias=False) if with_lm_head else None

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden = block(hidden)
        return hidden


class MedusaHeads(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        vocab_size: int,
        num_heads: int = 4,
        num_layers: int = 1,
        shared_lm_head: bool = False,
        head_vocab_size: int | None = None,
        base_model: str = "",
    ) -> None:
        super().__init__()
        self.config = HeadsConfig(
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            num_heads=num_heads,
            num_layers=num_layers,
            base_model=base_model,
            shared_lm_head=shared_lm_head,
            head_vocab_size=head_vocab_size,
        )
        self.heads = nn.ModuleList(
            MedusaHead(hidden_size, self.config.head_vocab_size, num_layers, with_lm_head=not shared_lm_head)
            for _ in range(num_heads)
        )
        # Base lm_head weight used when shared_lm_head is on; a buffer-like reference, never saved.
        self.shared_weight: torch.Tensor | None = None
        self._shared_rows: tuple | None = None  # (shared_weight, token_map state, its rows) with a truncated vocabulary
        if head_vocab_size is not None and head_vocab_size != vocab_size:
            self.register_buffer("token_map", torch.arange(head_vocab_size, dtype=torch.long))
        else:
            self.token_map = None

    @classmethod
    def from_config(cls, config: HeadsConfig) -> "MedusaHeads":
        heads = cls(
            config.hidden_size,
            config.vocab_size,
            config.num_heads,
            config.num_layers,
            shared_lm_head=config.shared_lm_head,
            head_vocab_size=config.head_vocab_size,
            base_model=config.base_model,
        )
        heads.config = config
        return heads

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def init_from_base(self, base_lm_head_weight: torch.Tensor) -> None:
        """Copy the base lm_head (rows of token_map when truncated) into every head's projection."""
        weight = base_lm_head_weight.detach()
        if self.config.shared_lm_head:
            self.shared_weight = weight
            return
        if self.token_map is not None:
            weight = weight[self.token_map.to(weight.device)]
        for head in self.heads:
            head.lm_head.weight.data.copy_(weight.to(head.lm_head.weight.dtype))

    def projection_weight(self, head_index: int) -> torch.Tensor:
        """[head_vocab, hidden] vocabulary projection of head `head_index`."""
        if self.config.shared_lm_head:
            if self.shared_weight is None:
                raise RuntimeError("shared_lm_head heads need init_from_base(base lm_head weight) before use")
            if self.token_map is None:
                return self.shared_weight
            # Truncated vocabulary: the token_map rows of the base lm_head, gathered once and
            # re-gathered only when the shared weight or the map changes (decoding calls this per step).
            map_state = (self.token_map._version, self.token_map.device)
            cached = self._shared_rows
            if cached is None or cached[0] is not self.shared_weight or cached[1] != map_state:
                rows = self.shared_weight[self.token_map.to(self.shared_weight.device)]
                self._shared_rows = cached = (self.shared_weight, map_state, rows)
            return cached[2]
        return self.heads[head_index].lm_head.weight

    def transform(self, hidden: torch.Tensor, head_index: int) -> torch.Tensor:
        """[..., hidden] -> [..., hidden] after head `head_index`'s ResBlocks."""
        return self.heads[head_index].transform(hidden)

    def head_logits(self, hidden: torch.Tensor, head_index: int) -> torch.Tensor:
        """[..., hidden] -> [..., vocab_size] logits of one head, in full-vocabulary ids."""
        transformed = self.transform(hidden, head_index)
        logits = F.linear(transformed, self.projection_weight(head_index).to(transformed.dtype))
        if self.token_map is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.config.vocab_size), torch.finfo(logits.dtype).min)
        return full.index_copy_(-1, self.token_map, logits)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, hidden] -> [num_heads, B, T, vocab_size]. Materialises every head's logits: for
        decoding small trees and tests; training uses loss.medusa_loss, which never does."""
        return torch.stack([self.head_logits(hidden, k) for k in range(self.num_heads)])

    # ---- saving and loading ------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write heads.safetensors + config.json into a staging folder that replaces `directory`
        only when both are complete (medusaforge.files.staging_directory)."""
        directory = Path(directory)
        with staging_directory(directory) as staging:
            tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
            save_file(tensors, str(staging / HEADS_FILE), metadata={"format": FORMAT_NAME})
            atomic_write_text(staging / CONFIG_FILE, json.dumps(asdict(self.config), indent=2) + "\n")
        return directory


def read_heads_config(directory: str | os.PathLike) -> HeadsConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no heads config here; is {directory} a medusaforge heads folder?") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        found = raw.get("format") if isinstance(raw, dict) else None
        raise ValueError(
            f"{path}: not a medusaforge heads config (format={found!r}); for a vLLM or original-Medusa "
            "folder use medusaforge.interop.importer.import_heads, which reads every layout"
        )
    known = set(HeadsConfig.__dataclass_fields__)
    return HeadsConfig(**{k: v for k, v in raw.items() if k in known})


def load_heads(
    directory: str | os.PathLike,
    base: nn.Module | None = None,
    allow_other_base: bool = False,
) -> MedusaHeads:
    """Load heads saved by `MedusaHeads.save` (our layout only); with `base`, check they belong to it.

    Folders in an engine's layout go through `interop.importer.import_heads`, which calls this for
    ours. No pickled code is ever executed: our folders are safetensors.
    """
    directory = Path(directory)
    config = read_heads_config(directory)
    heads = MedusaHeads.from_config(config)
    path = directory / HEADS_FILE
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing heads weights") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match config.json: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, config.json implies {tuple(expected[name].shape)}"
            )
    heads.load_state_dict(tensors)
    if base is not None:
        check_heads_match_base(heads, base, source=str(directory), allow_other_base=allow_other_base)
    return heads


def check_heads_match_base(heads: MedusaHeads, base: nn.Module, source: str, allow_other_base: bool = False) -> None:
    """Refuse heads whose shapes (or trained-against weights) differ from the base model's."""
    from medusaforge.models import base_fingerprint, lm_head_of

    config = heads.config
    weight = lm_head_of(base).weight
    base_vocab, base_hidden = weight.shape
    problems = []
    if config.hidden_size != base_hidden:
        problems.append(f"hidden_size {config.hidden_size} != base {base_hidden}")
    if config.vocab_size != base_vocab:
        problems.append(f"vocab_size {config.vocab_size} != base {base_vocab}")
    if problems:
        raise ValueError(
            f"{source}: heads were trained for base model {config.base_model!r} and do not fit this one: "
            + "; ".join(problems)
        )
    if config.base_fingerprint and not allow_other_base:
        actual = base_fingerprint(base)
        if actual != config.base_fingerprint:
            raise ValueError(
                f"{source}: heads were trained against different base weights "
                f"(fingerprint {config.base_fingerprint}, this model {actual}; base_model {config.base_model!r}). "
                "Use the matching base (for Medusa-2, the merged/adapted model saved with the heads), "
                "or pass --allow-other-base to use them anyway."
            )
    if config.shared_lm_head:
        heads.init_from_base(weight)
