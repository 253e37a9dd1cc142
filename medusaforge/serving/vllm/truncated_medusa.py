"""vLLM's Medusa model, with per-head projections over the truncated vocabulary the heads trained on.

vLLM 0.32 (`model_executor/models/medusa.py`) builds every per-head `lm_heads.{k}` over the FULL
vocabulary; only the shared `original_lm_head` may be truncated, and `config/speculative.py`
resets `truncated_vocab_size` to the target's vocabulary when the draft config's differs. So heads
trained on 8,192 of SmolLM2's 49,152 tokens are exported widened (interop/layouts.py: the trained
rows at `token_map`, shadow rows elsewhere), and vLLM pays four 49,152-row projections per step.

This class reads the same exported folder (`medusaforge export --format vllm`, no new layout) and
keeps only the trained rows: when config.json carries our provenance with
`head_vocab_size < vocab_size` and a `token_map` is stored, each head projects to `head_vocab_size`
rows (checkpoint rows `lm_heads.{k}.weight[token_map]`, bit for bit the trained ones; a checkpoint
that already holds `head_vocab_size` rows is read as is), and the argmax is mapped back through
`token_map`. The drafted tokens are the trained heads' own, at the truncated cost; the widened
rows agree with them except in full_vocab.py's one corner (ids below the first in-map id, when every
trained logit is negative). Any other Medusa folder gets vLLM's own class unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

from medusaforge.serving.vllm import check_vllm_version

check_vllm_version()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from vllm.config import VllmConfig  # noqa: E402
from vllm.model_executor.layers.logits_processor import LogitsProcessor  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead  # noqa: E402
from vllm.model_executor.model_loader.weight_utils import default_weight_loader  # noqa: E402
from vllm.model_executor.models.medusa import Medusa, ResidualBlock  # noqa: E402
from vllm.model_executor.models.utils import maybe_prefix  # noqa: E402

from medusaforge.interop.full_vocab import SHADOW  # noqa: E402
from medusaforge.interop.layouts import PROVENANCE_KEY  # noqa: E402


def trained_head_vocab(config) -> int | None:
    """head_vocab_size when the folder holds our heads trained on a truncated vocabulary and widened
    with shadow rows (the vLLM layout's fill, made to keep the argmax), else None. The original
    Medusa layout's zero rows win whenever every trained logit is negative, and its readers take
    top-k for trees: that layout keeps vLLM's class."""
    provenance = getattr(config, PROVENANCE_KEY, None)
    if not isinstance(provenance, dict) or provenance.get("widened_vocab_fill") not in (SHADOW, None):
        return None
    head_vocab = provenance.get("head_vocab_size")
    if not isinstance(head_vocab, int) or not 0 < head_vocab < config.vocab_size:
        return None
    return head_vocab


class TruncatedMedusa(Medusa):
    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = ""):
        # Not ours (or not truncated): vLLM's own class, untouched.
        if trained_head_vocab(vllm_config.speculative_config.draft_model_config.hf_config) is None:
            return Medusa(vllm_config=vllm_config, prefix=prefix)
        return super().__new__(cls)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # Medusa.__init__ would allocate the full-vocabulary heads this class exists to avoid.
        nn.Module.__init__(self)
        config = vllm_config.speculative_config.draft_model_config.hf_config
        self.config = config
        self.blocks = nn.ModuleList(
            ResidualBlock(config=config, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers)
            for _ in range(config.num_heads)
        )
        self.orig_vocab_size = config.vocab_size
        self.truncated_vocab_size = trained_head_vocab(config)
        if getattr(config, "original_lm_head", False):
            self.lm_head = ParallelLMHead(self.truncated_vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
            self.lm_heads = [self.lm_head for _ in range(config.num_heads)]
        else:
            self.lm_heads = nn.ModuleList(
                ParallelLMHead(self.truncated_vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, f"lm_heads.{i}"))
                for i in range(config.num_heads)
            )
        self.logits_processor = LogitsProcessor(self.truncated_vocab_size, self.truncated_vocab_size,
                                                getattr(config, "logit_scale", 1.0))
        self.register_buffer("token_map", torch.zeros(self.truncated_vocab_size, dtype=torch.long), persistent=False)

    def compute_logits(self, hidden_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """[B, H] per head -> [B, vocab] per head: the truncated logits at token_map, -inf elsewhere
        (MedusaProposer takes the argmax of what this returns)."""
        logits_lst = []
        for hidden, lm_head in zip(hidden_states, self.lm_heads):
            logits = self.logits_processor(lm_head, hidden)  # [B, head_vocab]: the only projection run
            if logits is None:
                continue
            full = logits.new_full((*logits.shape[:-1], self.orig_vocab_size), -torch.inf)
            logits_lst.append(full.index_copy_(-1, self.token_map, logits))
        return logits_lst

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        tensors = {self._remap_old_checkpoint_key(name.replace("medusa_heads.", "")): w for name, w in weights}
        if "token_map" not in tensors:
            raise ValueError(f"a Medusa folder with {PROVENANCE_KEY}.head_vocab_size {self.truncated_vocab_size} "
                             "stores no token_map: re-export it with `medusaforge export --format vllm`")
        token_map = tensors.pop("token_map").long()
        if token_map.shape != (self.truncated_vocab_size,):
            raise ValueError(f"token_map has shape {list(token_map.shape)}, config says {self.truncated_vocab_size} tokens")
        self.token_map.copy_(token_map.to(self.token_map.device))
        loaded = set()
        for name, weight in tensors.items():
            if getattr(self.config, "original_lm_head", False) and name == "lm_heads.0.weight":
                name = "lm_head.weight"
            if name not in params:
                continue
            if "lm_head" in name and weight.shape[0] == self.orig_vocab_size:
                weight = weight[token_map]  # the widened export: keep the trained rows
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, weight)
            loaded.add(name)
        return loaded
