"""The EAGLE-3 draft model: shapes, the fusion layer's inputs, the training-time-test unroll against
single decode steps with the draft's own KV cache, save/load, and the draft vocabulary maps."""

from __future__ import annotations

import pytest
import torch

from medusaforge.drafters.eagle3 import (
    DraftKVCache,
    Eagle3Draft,
    default_feature_layers,
    draft_config_from_base,
    load_draft,
)
from medusaforge.training.eagle3 import start_layer_from
from tests.helpers import tiny_llama

VOCAB = 256


def make_draft(draft_vocab_size: int = VOCAB, feature_layers=(0, 1, 2), seed: int = 1):
    base = tiny_llama(VOCAB, hidden_size=32)
    config = draft_config_from_base(base.config, draft_vocab_size, feature_layers)
    torch.manual_seed(seed)
    return base, Eagle3Draft(config, base.get_input_embeddings()).eval()


def test_parameter_names_and_shapes_are_the_engines_keys():
    base, draft = make_draft(draft_vocab_size=100)
    hidden, heads, kv_heads, head_dim = 32, 4, 2, 8
    shapes = {name: tuple(t.shape) for name, t in draft.state_dict().items()}
    assert shapes == {
        "fc.weight": (hidden, 3 * hidden),
        "midlayer.input_layernorm.weight": (hidden,),
        "midlayer.hidden_norm.weight": (hidden,),
        "midlayer.self_attn.q_proj.weight": (heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": (kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": (kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "midlayer.post_attention_layernorm.weight": (hidden,),
        "midlayer.mlp.gate_proj.weight": (64, hidden),
        "midlayer.mlp.up_proj.weight": (64, hidden),
        "midlayer.mlp.down_proj.weight": (hidden, 64),
        "norm.weight": (hidden,),
        "lm_head.weight": (100, hidden),
        "d2t": (100,),
        "t2d": (VOCAB,),
    }
    # The embedding is the base's and frozen: no trainable copy in the draft.
    assert all(p is not base.get_input_embeddings().weight for p in draft.parameters())
    ids = torch.randint(0, VOCAB, (2, 5))
    fused = torch.randn(2, 5, hidden)
    out, cache = draft.step(ids, fused, torch.arange(5).expand(2, 5))
    assert out.shape == (2, 5, hidden) and draft.logits(out).shape == (2, 5, 100) and len(cache) == 5
    assert draft.config.architectures == ["LlamaForCausalLMEagle3"] and draft.config.draft_vocab_size == 100


def test_default_feature_layers_follow_vllm_and_are_checked():
    assert default_feature_layers(30) == (2, 15, 27)
    base = tiny_llama(VOCAB, hidden_size=32)
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        draft_config_from_base(base.config, 10, (0, 1, 3))


def test_fusion_reads_exactly_the_configured_layers():
    base, draft = make_draft(feature_layers=(2, 0, 1))
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        states = base(ids, output_hidden_states=True).hidden_states
    assert len(states) == 3
    features = draft.select_features(states)
    assert torch.equal(features, torch.cat([states[2], states[0], states[1]], dim=-1))
    # Changing a layer that is not configured leaves the fused feature alone; changing one that is does not.
    with torch.no_grad():
        fused = draft.fuse(features)
        altered = list(states)
        altered[1] = altered[1] + 1.0
        assert not torch.allclose(draft.fuse(draft.select_features(altered)), fused)
    _, draft_low = make_draft(feature_layers=(0, 0, 2))
    altered = list(states)
    altered[1] = altered[1] + 1.0
    assert torch.equal(draft_low.select_features(altered), draft_low.select_features(states))


@pytest.mark.parametrize("num_steps", [1, 4])
def test_unroll_equals_single_decode_steps_with_the_kv_cache(num_steps):
    _, draft = make_draft()
    torch.manual_seed(3)
    length = 9
    ids = torch.randint(0, VOCAB, (2, length))
    fused = torch.randn(2, length, 32)
    with torch.no_grad():
        unrolled = draft.unroll(ids, fused, num_steps)
        for i in range(length - num_steps):
            # Step 0 over the prefix, as a decoder does for the verified context...
            tokens = ids[:, 1 : i + 2]
            hidden, cache = draft.step(tokens, fused[:, : i + 1], torch.arange(i + 1).expand(2, -1))
            torch.testing.assert_close(hidden, unrolled[0][:, : i + 1], rtol=1e-5, atol=1e-5)
            hidden = hidden[:, -1:]
            # ...then one token at a time, each reading the previous output and the cache.
            for k in range(1, num_steps):
                token = ids[:, i + 1 + k : i + 2 + k]
                hidden, cache = draft.step(token, hidden, torch.full((2, 1), i + k), cache)
                torch.testing.assert_close(hidden[:, 0], unrolled[k][:, i], rtol=1e-5, atol=1e-5)
            assert len(cache) == i + num_steps


def test_cache_crop_and_keep_equal_a_cache_built_token_by_token():
    _, draft = make_draft()
    ids = torch.randint(0, VOCAB, (1, 6))
    fused = torch.randn(1, 6, 32)
    positions = torch.arange(6)[None]
    with torch.no_grad():
        _, full = draft.step(ids, fused, positions)
        stepwise = DraftKVCache()
        for i in [0, 1, 3]:
            _, stepwise = draft.step(ids[:, i : i + 1], fused[:, i : i + 1], positions[:, i : i + 1], stepwise)
    # Token by token with i=3 after 0,1 has a different causal past, so compare the keys, which
    # depend only on the token's own input and position.
    full.keep(torch.tensor([0, 1, 3]))
    torch.testing.assert_close(full.keys, stepwise.keys)
    torch.testing.assert_close(full.values, stepwise.values)
    full.crop(2)
    assert len(full) == 2


def test_tree_mask_equals_causal_on_a_chain():
    _, draft = make_draft()
    ids = torch.randint(0, VOCAB, (1, 5))
    fused = torch.randn(1, 5, 32)
    positions = torch.arange(5)[None]
    with torch.no_grad():
        causal, _ = draft.step(ids, fused, positions)
        mask = torch.ones(5, 5, dtype=torch.bool).tril()[None]
        masked, _ = draft.step(ids, fused, positions, attention_mask=mask)
    torch.testing.assert_close(masked, causal)


def test_save_load_round_trip_is_bit_identical(tmp_path):
    base, draft = make_draft(draft_vocab_size=50)
    d2t = torch.arange(50) * 3
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[torch.arange(50) * 4] = True
    draft.set_vocab(d2t, t2d)
    draft.save(tmp_path / "draft")
    loaded = load_draft(tmp_path / "draft", base.get_input_embeddings())
    for name, tensor in draft.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert loaded.feature_layers == draft.feature_layers
    (tmp_path / "draft" / "config.json").write_text("{ nope")
    with pytest.raises(ValueError, match="config.json: line 1"):
        load_draft(tmp_path / "draft", base.get_input_embeddings())


def test_layer_started_from_the_base_is_that_base_layer_over_the_high_feature():
    # Layer 0 reads hidden_states[0] and writes hidden_states[1] (pre-norm: the base has 2 layers).
    base, draft = make_draft(feature_layers=(0, 0, 0))
    start_layer_from(draft, base.model.layers[0])
    hidden = draft.config.hidden_size
    for name in ("q_proj", "k_proj", "v_proj"):  # silence the embedding half, the only new input
        getattr(draft.midlayer.self_attn, name).weight.data[:, :hidden] = 0
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        states = base(ids, output_hidden_states=True).hidden_states
        out, _ = draft.step(ids, draft.fuse(draft.select_features(states)), torch.arange(6).expand(2, 6))
    torch.testing.assert_close(out, states[1], atol=1e-5, rtol=1e-4)


def test_a_base_layer_of_another_shape_is_refused_and_changes_nothing():
    _, draft = make_draft()
    before = {name: t.clone() for name, t in draft.state_dict().items()}
    other = tiny_llama(VOCAB, hidden_size=16)
    with pytest.raises(ValueError, match="do not fit"):
        start_layer_from(draft, other.model.layers[0])
    with pytest.raises(ValueError, match="lacks a part"):
        start_layer_from(draft, torch.nn.Linear(4, 4))
    assert all(torch.equal(before[name], t) for name, t in draft.state_dict().items())
