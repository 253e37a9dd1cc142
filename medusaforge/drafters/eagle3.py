"""EAGLE-3 draft model: one Llama decoder layer over fused base features, drafting token by token.

Parameter names are the engines' checkpoint keys (SpecForge writes them; vLLM and SGLang
`llama_eagle3.py` load them), so `state_dict()` needs no renaming on export:
  fc.weight                                 [H, 3H]  fuses the low/mid/high base hidden states
  midlayer.input_layernorm.weight           [H]      RMSNorm of the token embedding
  midlayer.hidden_norm.weight               [H]      RMSNorm of the fused feature (step 0) or of the
                                                     draft's own previous output hidden (later steps)
  midlayer.self_attn.{q,k,v}_proj.weight    [*, 2H]  attention reads cat(normed embedding, normed hidden)
  midlayer.self_attn.o_proj.weight          [H, heads*head_dim]
  midlayer.post_attention_layernorm.weight  [H];  midlayer.mlp.{gate,up,down}_proj.weight
  norm.weight [H];  lm_head.weight [draft_vocab, H]
  d2t [draft_vocab] int64: target_id = draft_id + d2t[draft_id];  t2d [vocab] bool: token is in the draft vocab
The token embedding is the base model's, frozen and not registered here (not in `state_dict()`).

The layer (as SpecForge's `LlamaDecoderLayer` for EAGLE-3): the residual is the *un-normed* hidden
input, so `out = h + attn(cat(input_layernorm(e), hidden_norm(h)))`, then `out += mlp(post_norm(out))`.
The output hidden state is `out` (pre-norm; it is fed back at the next step); logits are
`lm_head(norm(out))` over the draft vocabulary.

Alignment (as vLLM's EAGLE proposer): the draft input at position i is the pair (feature f_i of the
base at position i, embedding of token t_{i+1}); it sits at position id i and its logits predict
t_{i+2}, i.e. they are trained against the base's own distribution at position i+1. At draft step k
(k >= 1) the pair is (draft output hidden of step k-1 at i, embedding of t_{i+1+k}) at position i+k.

Feature layers are indices into HF's `output_hidden_states` tuple (index 0 = embeddings, index j =
output of decoder layer j-1). The default (2, L//2, L-3) equals vLLM's / SpecForge's
`eagle_aux_hidden_state_layer_ids`, which capture the residual stream *before* layer j runs, i.e.
the same tensor as HF index j. For SmolLM2-135M (L = 30): (2, 15, 27). This module's own
config.json keeps these HF indices under `eagle_config`; SGLang/SpecForge read that key as
output-of-layer ids (HF index - 1), so serve a draft through interop/eagle3_layout's export, which
writes each engine's numbering. The last HF index (L) is post-norm and no engine can capture it.

API (B = batch, S = new positions, T = cached positions, H = hidden):
  config = draft_config_from_base(base.config, draft_vocab_size, feature_layers=None)
  draft = Eagle3Draft(config, base.get_input_embeddings())
  feats = draft.select_features(out.hidden_states)      # [B, S, 3H] from the configured layers
  fused = draft.fuse(feats)                              # [B, S, H]
  hidden, cache = draft.step(input_ids, fused, position_ids, cache=None, attention_mask=None)
      # one draft step over S positions with its own KV cache (appended in place; a new one if None).
      # attention_mask: None = causal over the new positions, all cached positions visible;
      # else bool [B or 1, S, T+S], True = may attend (tree drafting).
  logits = draft.logits(hidden)                          # [B, S, draft_vocab]
  target_ids = draft.to_target(draft_ids)                # draft vocab ids -> base vocab ids
  hiddens = draft.unroll(input_ids, fused, num_steps)    # training-time test: list of [B, S, H]
  cache.crop(n) drops entries from n on; cache.keep(index) keeps the given positions (tree accept).
  draft.save(dir) / load_draft(dir, embed_tokens): config.json + model.safetensors (never pickle).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from medusaforge.files import staging_directory

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ARCHITECTURE = "LlamaForCausalLMEagle3"


def default_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's / SpecForge's low, middle and high layers, as HF `output_hidden_states` indices."""
    return (2, num_layers // 2, num_layers - 3)


def check_feature_layers(feature_layers, num_layers: int) -> tuple[int, int, int]:
    layers = tuple(int(i) for i in feature_layers)
    if len(layers) != 3 or any(not 0 <= i <= num_layers for i in layers):
        raise ValueError(
            f"EAGLE-3 feature layers must be three hidden_states indices in [0, {num_layers}] "
            f"(the base has {num_layers} layers), got {list(feature_layers)}"
        )
    return layers


def draft_config_from_base(base_config, draft_vocab_size: int, feature_layers=None) -> LlamaConfig:
    """The draft's LlamaConfig: one layer shaped like the base's, the EAGLE-3 fields engines read."""
    base_config = getattr(base_config, "get_text_config", lambda: base_config)()
    num_layers = base_config.num_hidden_layers
    layers = check_feature_layers(feature_layers or default_feature_layers(num_layers), num_layers)
    hidden = base_config.hidden_size
    heads = base_config.num_attention_heads
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=base_config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=getattr(base_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(base_config, "head_dim", None) or hidden // heads,
        hidden_act=base_config.hidden_act,
        rms_norm_eps=base_config.rms_norm_eps,
        max_position_embeddings=base_config.max_position_embeddings,
        rope_parameters=dict(base_config.rope_parameters),
        vocab_size=base_config.vocab_size,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    )
    config.architectures = [ARCHITECTURE]
    config.draft_vocab_size = int(draft_vocab_size)
    config.target_hidden_size = hidden
    config.eagle_config = {"eagle_aux_hidden_state_layer_ids": list(layers)}
    # vLLM's top-level key, same (HF) numbering: interop/eagle3_layout reads it before the nested
    # one, which SGLang/SpecForge number from the layer's output (see that module's NOTE).
    config.eagle_aux_hidden_state_layer_ids = list(layers)
    if not 0 < config.draft_vocab_size <= config.vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {config.vocab_size}], got {draft_vocab_size}")
    return config


class DraftKVCache:
    """The draft layer's keys and values (after rotary), [B, kv_heads, T, head_dim].

    Rejected entries are dropped with `crop` / `keep`; nothing else refers to positions."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values

    def crop(self, length: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]

    def keep(self, index: torch.Tensor) -> None:
        """Keep cached positions `index` [n] (in this order), e.g. the accepted path of a tree."""
        if self.keys is not None:
            self.keys = self.keys.index_select(2, index)
            self.values = self.values.index_select(2, index)


class Eagle3Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        two_h = 2 * config.hidden_size
        self.q_proj = nn.Linear(two_h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(two_h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(two_h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, S, 2H] -> q [B, heads, S, hd], k and v [B, kv_heads, S, hd], rotary applied."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def output(self, context: torch.Tensor) -> torch.Tensor:
        """context [B, heads, S, hd] -> [B, S, H]."""
        batch, _, length, _ = context.shape
        return self.o_proj(context.transpose(1, 2).reshape(batch, length, -1))

    def attend(self, q, keys, values, allowed: torch.Tensor) -> torch.Tensor:
        """Plain softmax attention; allowed: bool broadcastable to [B, heads, S, T]."""
        groups = self.num_heads // self.num_kv_heads
        keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
        scores = torch.matmul(q, keys.transpose(2, 3)) * self.scale
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, values)


class Eagle3Layer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attention_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # Embedding first, as SpecForge and vLLM concatenate; the q/k/v weights depend on the order.
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, hidden: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
        out = hidden + attention_out
        return out + self.mlp(self.post_attention_layernorm(out))


class Eagle3Draft(nn.Module):
    def __init__(self, config: LlamaConfig, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.feature_layers = tuple(config.eagle_config["eagle_aux_hidden_state_layer_ids"])
        self.fc = nn.Linear(3 * config.target_hidden_size, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        # Identity maps until a draft vocabulary is set (set_vocab), so a full-vocab draft works as is.
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64))
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("t2d", t2d)
        # A tuple hides the base embedding from register/state_dict/parameters: it is frozen and
        # belongs to the base (engines take it from the target model).
        self._embed = (embed_tokens,)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self._embed[0]

    def set_vocab(self, d2t: torch.Tensor, t2d: torch.Tensor) -> None:
        self.d2t.copy_(d2t)
        self.t2d.copy_(t2d)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.embed_tokens(input_ids).to(self.fc.weight.dtype)

    def select_features(self, hidden_states) -> torch.Tensor:
        """HF `output_hidden_states` tuple -> [B, S, 3H], low/mid/high concatenated in that order."""
        return torch.cat([hidden_states[i] for i in self.feature_layers], dim=-1)

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.to(self.fc.weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def _rotary(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self.rotary_emb(x, position_ids)

    def step(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        cache: DraftKVCache | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DraftKVCache]:
        """One draft step over S new positions. input_ids [B, S]; hidden [B, S, H] (fused feature or
        the draft's previous output); position_ids [B, S]. Returns (output hidden [B, S, H], cache)."""
        cache = DraftKVCache() if cache is None else cache
        layer = self.midlayer
        x = layer.attention_input(self.embed(input_ids), hidden)
        cos, sin = self._rotary(x, position_ids)
        q, k, v = layer.self_attn.project(x, cos, sin)
        past = len(cache)
        keys, values = cache.append(k, v)
        length = q.shape[2]
        if attention_mask is None:
            # Causal among the new positions; every cached position is visible.
            query = torch.arange(length, device=q.device)[:, None]
            key = torch.arange(past + length, device=q.device)[None, :]
            allowed = (key < past) | (key - past <= query)
        else:
            allowed = attention_mask[:, None] if attention_mask.dim() == 3 else attention_mask
        context = layer.self_attn.attend(q, keys, values, allowed)
        return layer.finish(hidden, layer.self_attn.output(context)), cache

    def unroll(
        self,
        input_ids: torch.Tensor,
        fused: torch.Tensor,
        num_steps: int,
        position_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Training-time test over a whole sequence. input_ids [B, S] are the text; fused [B, S, H].

        Step k at position i reads token t_{i+1+k} (teacher forced; 0 past the end, to be masked by
        the loss) and position id i+k; step 0 reads fused[i], step k > 0 the step k-1 output at i.
        Step k's query at i attends to step 0's keys at positions <= i and to steps 1..k's keys at
        i only: exactly what a decoder's cache holds after drafting k tokens after position i.
        Returns [num_steps] output hiddens, each [B, S, H]."""
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        attn = self.midlayer.self_attn
        groups = attn.num_heads // attn.num_kv_heads
        causal = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        keys, values, outputs = [], [], []
        hidden = fused
        for k in range(num_steps):
            tokens = F.pad(input_ids[:, 1 + k :], (0, 1 + k))
            x = self.midlayer.attention_input(self.embed(tokens), hidden)
            cos, sin = self._rotary(x, position_ids + k)
            q, key, value = attn.project(x, cos, sin)
            keys.append(repeat_kv(key, groups))
            values.append(repeat_kv(value, groups))
            # [B, heads, S, S] against step 0, then one diagonal score per later step: [B, heads, S, k]
            scores = torch.matmul(q, keys[0].transpose(2, 3)) * attn.scale
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            # Elementwise products are not autocast ops: accumulate in fp32 as the matmul above does.
            diagonal = [((q.float() * keys[m].float()).sum(-1, keepdim=True) * attn.scale).to(scores.dtype) for m in range(1, k + 1)]
            probs = torch.softmax(torch.cat([scores, *diagonal], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
            context = torch.matmul(probs[..., :length], values[0])
            for m in range(1, k + 1):
                context = context + probs[..., length + m - 1 : length + m] * values[m]
            hidden = self.midlayer.finish(hidden, attn.output(context))
            outputs.append(hidden)
        return outputs

    def save(self, directory: str | os.PathLike) -> Path:
        """config.json (a LlamaConfig as engines read it) + model.safetensors, written atomically."""
        directory = Path(directory)
        with staging_directory(directory) as staging:
            tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
            # The staging folder is what makes the save atomic; files inside it need no rename of their own.
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
            (staging / CONFIG_FILE).write_text(self.config.to_json_string())
        return directory


def read_draft_config(directory: str | os.PathLike) -> LlamaConfig:
    path = Path(directory) / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no EAGLE-3 draft config here") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    for key in ("draft_vocab_size", "eagle_config", "hidden_size", "vocab_size"):
        if key not in data:
            raise ValueError(f"{path}: missing '{key}'; not an EAGLE-3 draft config")
    config = LlamaConfig.from_dict(data)
    config.target_hidden_size = data.get("target_hidden_size", data["hidden_size"])
    return config


def load_draft(directory: str | os.PathLike, embed_tokens: nn.Embedding) -> Eagle3Draft:
    """A draft saved by `Eagle3Draft.save`; safetensors only, so loading never runs pickled code."""
    config = read_draft_config(directory)
    draft = Eagle3Draft(config, embed_tokens)
    path = Path(directory) / WEIGHTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing draft weights")
    state = load_file(str(path))
    expected = draft.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: {name} has shape {list(tensor.shape)}, config says {list(expected[name].shape)}")
    draft.load_state_dict(state)
    return draft
