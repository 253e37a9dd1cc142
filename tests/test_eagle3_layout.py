"""EAGLE-3 export layout: bit-identical round trip, and replicas of the vLLM and SGLang loaders'
key and shape rules, written from their source (cited at each replica)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base
from medusaforge.interop.eagle3_card import eagle3_card
from medusaforge.interop.eagle3_layout import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    engine_config,
    export_eagle3,
    import_eagle3,
    is_eagle3_folder,
    read_layout,
)
from tests.helpers import tiny_llama

VOCAB, DRAFT_VOCAB, HIDDEN, BASE_LAYERS = 256, 100, 32, 4
FEATURES = (1, 2, 3)


def make_draft(seed: int = 0):
    base = tiny_llama(VOCAB, hidden_size=HIDDEN)
    base.config.num_hidden_layers = BASE_LAYERS  # only the count matters to the layout
    config = draft_config_from_base(base.config, DRAFT_VOCAB, FEATURES)
    torch.manual_seed(seed)
    draft = Eagle3Draft(config, base.get_input_embeddings())
    with torch.no_grad():
        for parameter in draft.parameters():  # norms away from 1, so a dropped tensor shows
            parameter.copy_(torch.randn_like(parameter))
    draft_ids = torch.sort(torch.randperm(VOCAB)[:DRAFT_VOCAB]).values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[draft_ids] = True
    draft.set_vocab(draft_ids - torch.arange(DRAFT_VOCAB), t2d)
    return base, draft


# ---- replicas of the engine loaders ---------------------------------------------------------------


def shapes(config: dict) -> dict:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    return {
        "q": (heads * head_dim, 2 * hidden), "k": (kv_heads * head_dim, 2 * hidden), "v": (kv_heads * head_dim, 2 * hidden),
        0: (inter, hidden), 1: (inter, hidden),  # gate, up
        "qkv": ((heads + 2 * kv_heads) * head_dim, 2 * hidden), "gate_up": (2 * inter, hidden),
        "o": (hidden, heads * head_dim), "down": (hidden, inter), "norm": (hidden,),
        "fc": (hidden, 3 * config.get("target_hidden_size", hidden)), "embed": (config["vocab_size"], hidden),
    }


STACKED = [(".qkv_proj", ".q_proj", "q"), (".qkv_proj", ".k_proj", "k"), (".qkv_proj", ".v_proj", "v"),
           (".gate_up_proj", ".gate_proj", 0), (".gate_up_proj", ".up_proj", 1)]


def layer_params(prefix: str, s: dict) -> dict:
    return {
        f"{prefix}.self_attn.qkv_proj.weight": s["qkv"], f"{prefix}.self_attn.o_proj.weight": s["o"],
        f"{prefix}.mlp.gate_up_proj.weight": s["gate_up"], f"{prefix}.mlp.down_proj.weight": s["down"],
        f"{prefix}.input_layernorm.weight": s["norm"], f"{prefix}.hidden_norm.weight": s["norm"],
        f"{prefix}.post_attention_layernorm.weight": s["norm"],
    }


def load_into(params: dict, name: str, tensor: torch.Tensor, s: dict, loaded: dict) -> None:
    """A stacked or plain weight into its parameter, checking shapes as the weight loaders do."""
    for param_name, shard_name, shard in STACKED:
        if shard_name in name:
            name = name.replace(shard_name, param_name)
            assert name in params, f"no parameter {name}"
            assert tuple(tensor.shape) == s[shard], f"{name} shard {shard}: {tuple(tensor.shape)} != {s[shard]}"
            loaded.setdefault(name, set()).add(shard)
            return
    assert name in params, f"no parameter {name}"
    assert tuple(tensor.shape) == params[name], f"{name}: {tuple(tensor.shape)} != {params[name]}"
    loaded[name] = None


def vllm_load(config: dict, tensors: dict, base_num_layers: int) -> tuple[int, ...]:
    """vllm/model_executor/models/llama_eagle3.py: Eagle3LlamaForCausalLM.__init__ / load_weights
    and LlamaModel.load_weights; registry.py maps LlamaForCausalLMEagle3 to it; aux layers from
    eagle3_utils.get_eagle3_aux_layers_from_config, captured in llama.py before layer idx runs.
    Checked against vLLM 0.32 as installed in .venv-vllm (same files), which makes
    draft_id_to_target_id only for a truncated draft vocabulary, and whose gpu_model_runner falls
    back to the nested eagle_config ids as-is.
    -> the HF hidden_states indices vLLM feeds to fc."""
    assert config["architectures"][0] in ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
    assert config["num_hidden_layers"] == 1  # layer 0 takes 2H; further layers would need weights here
    assert not config.get("attention_bias", False)  # else the qkv / o_proj biases would be missing
    s = shapes(config)
    draft_vocab = config.get("draft_vocab_size") or config["vocab_size"]
    params = {"model.embed_tokens.weight": s["embed"], "model.norm.weight": s["norm"], "lm_head.weight": (draft_vocab, config["hidden_size"]),
              **layer_params("model.layers.0", s)}
    if draft_vocab != config["vocab_size"]:
        params["draft_id_to_target_id"] = (draft_vocab,)
    if (config.get("eagle_config") or {}).get("use_aux_hidden_state", True):
        params["model.fc.weight"] = s["fc"]
    loaded: dict = {}
    for name, tensor in tensors.items():
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
            assert tensor.dtype == torch.int64
        elif "lm_head" not in name:
            name = "model." + name
        load_into(params, name.replace("midlayer.", "layers.0."), tensor, s, loaded)
    # embed_tokens is skipped when absent (vLLM shares the target's); everything else must arrive.
    assert set(params) - set(loaded) <= {"model.embed_tokens.weight"}, set(params) - set(loaded)
    assert loaded["model.layers.0.self_attn.qkv_proj.weight"] == {"q", "k", "v"}
    assert loaded["model.layers.0.mlp.gate_up_proj.weight"] == {0, 1}
    if "draft_id_to_target_id" in params:
        assert "draft_id_to_target_id" in loaded, "a truncated draft vocabulary without d2t"
        # compute_logits: logits_new[:, arange(draft_vocab) + d2t] = logits
        targets = torch.arange(draft_vocab) + tensors["d2t"]
        assert 0 <= int(targets.min()) and int(targets.max()) < config["vocab_size"]
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    ids = config.get("eagle_aux_hidden_state_layer_ids") or nested or (2, base_num_layers // 2, base_num_layers - 3)
    assert all(0 <= i < base_num_layers for i in ids), "a layer id vLLM never captures"
    return tuple(ids)


def sglang_load(config: dict, tensors: dict, base_num_layers: int) -> tuple[tuple[int, ...], torch.Tensor]:
    """python/sglang/srt/models/llama_eagle3.py: LlamaForCausalLMEagle3.__init__ / load_weights;
    layers from model_runner.py (eagle_config["eagle_aux_hidden_state_layer_ids"]) through
    llama.py set_eagle3_layers_to_capture ([val + 1 for val in layer_ids], captured before layer i).
    SGLang skips unknown names silently; the replica fails on them, since that weight stays random.
    -> (HF indices captured, hot_token_id)."""
    assert "LlamaForCausalLMEagle3" in config["architectures"]
    assert config["num_hidden_layers"] == 1
    s = shapes(config)
    tied = config.get("tie_word_embeddings", False)
    params = {"model.embed_tokens.weight": s["embed"], "model.fc.weight": s["fc"], "model.norm.weight": s["norm"],
              **layer_params("model.midlayer", s)}
    if tied:
        # lm_head is embed_tokens itself: [vocab, H], not a draft-vocabulary head
        assert config.get("draft_vocab_size") in (None, config["vocab_size"]), "tie_word_embeddings with a draft vocabulary"
    else:
        params["lm_head.weight"] = (config.get("draft_vocab_size") or config["vocab_size"], config["hidden_size"])
    loaded: dict = {}
    hot_token_id = None
    for name, tensor in tensors.items():
        if "d2t" in name:
            hot_token_id = tensor + torch.arange(tensor.shape[0])
            continue
        if "t2d" in name:
            continue
        # "model." is prefixed unless the name is already a parameter (lm_head.weight); a stacked
        # shard resolves to its fused parameter inside load_into. An unknown name raises there.
        load_into(params, name if name in params else f"model.{name}", tensor, s, loaded)
    assert set(params) - set(loaded) <= {"model.embed_tokens.weight"}, set(params) - set(loaded)
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    capture = [i + 1 for i in nested] if nested else [2, base_num_layers // 2, base_num_layers - 3]
    assert all(0 <= i < base_num_layers for i in capture), "a layer SGLang never captures"
    return tuple(capture), hot_token_id


# ---- tests -------------------------------------------------------------------------------------------


def test_round_trip_is_bit_identical(tmp_path):
    base, draft = make_draft()
    out = export_eagle3(draft, tmp_path / "eagle3", base_num_layers=BASE_LAYERS)
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    back = import_eagle3(out, base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    original, loaded = draft.state_dict(), back.state_dict()
    assert original.keys() == loaded.keys()
    for name in original:
        assert original[name].dtype == loaded[name].dtype and torch.equal(original[name], loaded[name]), name
    assert back.feature_layers == FEATURES
    assert back.config.rope_parameters == draft.config.rope_parameters
    # The files themselves: exporting the imported draft writes the same bytes.
    again = export_eagle3(back, tmp_path / "again", base_num_layers=BASE_LAYERS)
    assert (again / WEIGHTS_FILE).read_bytes() == (out / WEIGHTS_FILE).read_bytes()
    assert (again / CONFIG_FILE).read_text() == (out / CONFIG_FILE).read_text()
    # And the imported draft computes the same thing.
    ids, fused = torch.randint(0, VOCAB, (1, 4)), torch.randn(1, 4, HIDDEN)
    positions = torch.arange(4)[None]
    assert torch.equal(draft.step(ids, fused, positions)[0], back.step(ids, fused, positions)[0])


def test_bf16_export_round_trips_in_bf16(tmp_path):
    base, draft = make_draft()
    out = export_eagle3(draft, tmp_path / "bf16", dtype=torch.bfloat16)
    config, tensors = read_layout(out)
    assert config["torch_dtype"] == "bfloat16" and tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    back = import_eagle3(out, base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    for name, tensor in draft.to(torch.bfloat16).state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_both_engine_loaders_accept_the_export_and_read_the_same_layers(tmp_path):
    _, draft = make_draft()
    config, tensors = read_layout(export_eagle3(draft, tmp_path / "eagle3", base_num_layers=BASE_LAYERS))
    assert "embed_tokens.weight" not in tensors  # both engines take the base's embedding
    assert vllm_load(config, tensors, BASE_LAYERS) == FEATURES
    capture, hot_token_id = sglang_load(config, tensors, BASE_LAYERS)
    assert capture == FEATURES
    assert torch.equal(hot_token_id, draft.to_target(torch.arange(DRAFT_VOCAB)))
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == DRAFT_VOCAB


def test_the_replicas_reject_broken_layouts(tmp_path):
    _, draft = make_draft()
    config, tensors = read_layout(export_eagle3(draft, tmp_path / "eagle3", base_num_layers=BASE_LAYERS))
    renamed = {k.replace("midlayer.", "layers.0."): v for k, v in tensors.items()}  # a plain-Llama name
    with pytest.raises(AssertionError):
        sglang_load(config, renamed, BASE_LAYERS)
    wrong_shape = {**tensors, "fc.weight": tensors["fc.weight"][:, :HIDDEN]}
    with pytest.raises(AssertionError):
        vllm_load(config, wrong_shape, BASE_LAYERS)
    with pytest.raises(AssertionError):
        sglang_load(config, wrong_shape, BASE_LAYERS)
    missing = {k: v for k, v in tensors.items() if k != "norm.weight"}
    with pytest.raises(AssertionError):
        vllm_load(config, missing, BASE_LAYERS)
    with pytest.raises(AssertionError, match="tie_word_embeddings"):
        sglang_load({**config, "tie_word_embeddings": True}, tensors, BASE_LAYERS)
    # HF-indexed ids under eagle_config (what eagle3.py's own config.json holds) read one layer deep in SGLang
    shifted = {**config, "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(FEATURES)}}
    with pytest.raises(AssertionError, match="never captures"):
        sglang_load(shifted, tensors, BASE_LAYERS)


def test_export_refuses_layers_the_engines_cannot_capture(tmp_path):
    base, draft = make_draft()
    draft.config.eagle_config = {"eagle_aux_hidden_state_layer_ids": [1, 2, BASE_LAYERS]}  # HF's post-norm output
    draft.config.eagle_aux_hidden_state_layer_ids = [1, 2, BASE_LAYERS]
    with pytest.raises(ValueError, match="cannot be captured"):
        engine_config(draft.config, torch.float32, base_num_layers=BASE_LAYERS)
    # Our own decoder reads any HF index, so such a draft still imports for decoding.
    draft.save(tmp_path / "draft")
    back = import_eagle3(tmp_path / "draft", base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    assert back.feature_layers == (1, 2, BASE_LAYERS)
    with pytest.raises(ValueError, match="not hidden_states indices"):
        import_eagle3(tmp_path / "draft", base.get_input_embeddings(), base_num_layers=BASE_LAYERS - 1)


def test_imports_a_specforge_folder(tmp_path):
    # SpecForge's config: no top-level ids, output-of-layer ids under eagle_config, legacy rope keys,
    # tie_word_embeddings copied from the base; it may also carry an embed_tokens copy.
    base, draft = make_draft()
    config, tensors = read_layout(export_eagle3(draft, tmp_path / "ours", base_num_layers=BASE_LAYERS))
    for key in ("eagle_aux_hidden_state_layer_ids", "rope_parameters", "target_hidden_size", "medusaforge"):
        config.pop(key, None)
    config["tie_word_embeddings"] = True
    folder = tmp_path / "specforge"
    folder.mkdir()
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    save_file({**tensors, "embed_tokens.weight": torch.zeros(VOCAB, HIDDEN)}, str(folder / WEIGHTS_FILE))
    assert is_eagle3_folder(folder)
    back = import_eagle3(folder, base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    assert back.feature_layers == FEATURES
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    # Without any ids the engines' default needs the base's depth.
    config["eagle_config"] = {}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="pass the base model"):
        import_eagle3(folder, base.get_input_embeddings())
    assert import_eagle3(folder, base.get_input_embeddings(), base_num_layers=30).feature_layers == (2, 15, 27)


def test_bad_folders_fail_clearly(tmp_path):
    base, draft = make_draft()
    embed = base.get_input_embeddings()
    with pytest.raises(FileNotFoundError, match="config.json"):
        import_eagle3(tmp_path, embed)
    out = export_eagle3(draft, tmp_path / "eagle3", base_num_layers=BASE_LAYERS)
    with pytest.raises(FileExistsError, match="not empty"):
        export_eagle3(draft, out)
    config, tensors = read_layout(out)
    (out / CONFIG_FILE).write_text('{"hidden_size": 32,\n oops}')
    with pytest.raises(ValueError, match="line 2"):
        import_eagle3(out, embed)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    d2t = tensors["d2t"].clone()
    d2t[1] = d2t[0] - 1  # draft ids 0 and 1 -> the same base token
    save_file({**tensors, "d2t": d2t}, str(out / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="same base token"):
        import_eagle3(out, embed)
    save_file({**tensors, "lm_head.weight": tensors["lm_head.weight"][:10]}, str(out / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="lm_head.weight has shape"):
        import_eagle3(out, embed)
    (out / WEIGHTS_FILE).unlink()
    (out / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only"):
        import_eagle3(out, embed)


def test_card_says_how_to_serve(tmp_path):
    _, draft = make_draft()
    config = engine_config(draft.config, torch.bfloat16, BASE_LAYERS)
    card = eagle3_card(config, "runs/eagle3-export", "HuggingFaceTB/SmolLM2-135M-Instruct", {"accept_length": 2.5, "identical": True})
    assert '"method": "eagle3"' in card and "--speculative-algorithm EAGLE3" in card
    assert "| 2.500 |" in card and str(list(FEATURES)) in card


def test_imports_the_training_output_folder(tmp_path):
    # train --method eagle3 writes OUT/draft/ with Eagle3Draft.save; its layers must read back as HF indices.
    base, draft = make_draft()
    draft.save(tmp_path / "draft")
    back = import_eagle3(tmp_path / "draft", base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    assert back.feature_layers == FEATURES
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_a_full_vocabulary_draft_is_written_without_maps(tmp_path):
    base = tiny_llama(VOCAB, hidden_size=HIDDEN)
    base.config.num_hidden_layers = BASE_LAYERS
    torch.manual_seed(0)
    draft = Eagle3Draft(draft_config_from_base(base.config, VOCAB, FEATURES), base.get_input_embeddings())
    config, tensors = read_layout(export_eagle3(draft, tmp_path / "full", base_num_layers=BASE_LAYERS))
    assert "d2t" not in tensors and "t2d" not in tensors
    assert vllm_load(config, tensors, BASE_LAYERS) == FEATURES
    assert sglang_load(config, tensors, BASE_LAYERS)[1] is None
    with pytest.raises(AssertionError, match="no parameter draft_id_to_target_id"):
        vllm_load(config, {**tensors, "d2t": torch.zeros(VOCAB, dtype=torch.int64)}, BASE_LAYERS)
    back = import_eagle3(tmp_path / "full", base.get_input_embeddings(), base_num_layers=BASE_LAYERS)
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, back.state_dict()[name]), name
    # Rows in another order come out in base-id order, computing the same logits per base token.
    shuffled = torch.randperm(VOCAB)
    draft.set_vocab(shuffled - torch.arange(VOCAB), torch.ones(VOCAB, dtype=torch.bool))
    _, tensors = read_layout(export_eagle3(draft, tmp_path / "shuffled", base_num_layers=BASE_LAYERS))
    assert torch.equal(tensors["lm_head.weight"][shuffled], draft.lm_head.weight.detach())
