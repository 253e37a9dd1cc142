"""Engine layouts: round trips, the engines' own loading rules, third-party and full-model folders."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from helpers import assert_same_state

from medusaforge.interop import importer, layout_readers as readers, layouts as formats
from medusaforge.interop.layouts import FormatWarning
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.importer import import_heads

HIDDEN, VOCAB = 16, 40


def random_heads(num_heads=3, num_layers=1, head_vocab_size=None, shared=False, seed=0) -> MedusaHeads:
    torch.manual_seed(seed)
    heads = MedusaHeads(HIDDEN, VOCAB, num_heads, num_layers, shared_lm_head=shared, head_vocab_size=head_vocab_size,
                        base_model="tiny-base")
    for parameter in heads.parameters():
        parameter.data.normal_()
    if head_vocab_size is not None:
        heads.token_map.copy_(torch.randperm(VOCAB)[:head_vocab_size])
    return heads


HIDDEN_STATES = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(1))


def test_vllm_round_trip_is_bit_identical():
    heads = random_heads(num_layers=2)
    back = readers.from_vllm(*formats.to_vllm(heads))
    assert_same_state(heads, back)
    assert torch.equal(heads(HIDDEN_STATES), back(HIDDEN_STATES))
    assert back.config.base_model == "tiny-base"


def test_medusa_round_trip_is_bit_identical():
    heads = random_heads(num_heads=4)
    back = readers.from_medusa(*formats.to_medusa(heads))
    assert_same_state(heads, back)
    assert torch.equal(heads(HIDDEN_STATES), back(HIDDEN_STATES))


def test_truncated_vocab_round_trips_through_vllm_widened_rows_and_token_map():
    heads = random_heads(head_vocab_size=10)
    tensors, config = formats.to_vllm(heads)
    # vLLM 0.32 builds per-head lm_heads over the full vocabulary, so the rows are widened and the
    # token map (kept for our import) must not switch vLLM's truncation on.
    assert config["truncated_vocab_size"] == VOCAB and tensors["lm_heads.0.weight"].shape == (VOCAB, HIDDEN)
    assert torch.equal(tensors["lm_heads.2.weight"][heads.token_map], heads.heads[2].lm_head.weight)
    assert config[formats.PROVENANCE_KEY]["widened_vocab_fill"] == "shadow"
    back = readers.from_vllm(tensors, config)
    assert_same_state(heads, back)
    assert torch.equal(heads(HIDDEN_STATES), back(HIDDEN_STATES))


def test_truncated_vocab_to_medusa_is_widened_with_zero_rows_and_keeps_the_trained_rows():
    heads = random_heads(head_vocab_size=10)
    tensors, config = formats.to_medusa(heads)
    full = tensors["0.1.weight"]
    in_map = torch.zeros(VOCAB, dtype=torch.bool)
    in_map[heads.token_map] = True
    assert torch.equal(full[heads.token_map], heads.heads[0].lm_head.weight)
    assert torch.count_nonzero(full[~in_map]) == 0
    assert config["medusa_fc_bias"] is True and config[formats.PROVENANCE_KEY]["widened_vocab_fill"] == "zero"
    # Imported back, the heads are what an engine runs: full vocabulary, in-map logits unchanged
    # (to rounding: a matmul with more rows may be blocked differently by the BLAS).
    widened = readers.from_medusa(tensors, config)
    assert widened.config.head_vocab_size == VOCAB
    torch.testing.assert_close(widened(HIDDEN_STATES)[..., heads.token_map], heads(HIDDEN_STATES)[..., heads.token_map],
                               rtol=1e-6, atol=1e-5)


def test_shared_lm_head_uses_vllm_original_lm_head_and_comes_back_shared():
    heads = random_heads(shared=True)
    base_weight = torch.randn(VOCAB, HIDDEN)
    heads.init_from_base(base_weight)
    tensors, config = formats.to_vllm(heads, base_weight)
    assert config["original_lm_head"] is True
    assert [n for n in tensors if n.startswith("lm_heads")] == ["lm_heads.0.weight"]
    back = readers.from_vllm(tensors, config)
    assert back.config.shared_lm_head
    assert_same_state(heads, back)
    assert torch.equal(heads(HIDDEN_STATES), back(HIDDEN_STATES))
    # The original layout has no sharing: every head gets a copy, and provenance restores sharing.
    tensors, config = formats.to_medusa(heads, base_weight)
    assert torch.equal(tensors["2.1.weight"], base_weight)
    back = readers.from_medusa(tensors, config)
    assert back.config.shared_lm_head and torch.equal(heads(HIDDEN_STATES), back(HIDDEN_STATES))


# ---- the engines' loading rules, rebuilt here from their published loaders -----------------------


class VllmStyleMedusa(nn.Module):
    """The module tree vLLM 0.32's model_executor/models/medusa.py builds from config.json:
    `blocks[h].layers[l]` Linear layers (bias only if medusa_fc_bias); `lm_heads[h]` over the FULL
    vocabulary, or with original_lm_head one `lm_head` over truncated_vocab_size rows. Its
    LogitsProcessor keeps the first truncated_vocab_size logits, which are scattered into a row of
    -inf at token_map when there is one."""

    def __init__(self, config: dict):
        super().__init__()
        hidden, fc_bias = config["hidden_size"], config.get("medusa_fc_bias", False)
        self.truncated = config.get("truncated_vocab_size") or config["vocab_size"]
        block = lambda: nn.Module()  # noqa: E731 - a bare container, like vLLM's ResidualBlock
        self.blocks = nn.ModuleList(block() for _ in range(config["num_heads"]))
        for b in self.blocks:
            b.layers = nn.ModuleList(nn.Linear(hidden, hidden, bias=fc_bias) for _ in range(config["num_hidden_layers"]))
        if config.get("original_lm_head"):
            self.lm_head = nn.Linear(hidden, self.truncated, bias=False)
        else:
            self.lm_heads = nn.ModuleList(nn.Linear(hidden, config["vocab_size"], bias=False)
                                          for _ in range(config["num_heads"]))
        self.config = config

    def logits(self, hidden: torch.Tensor, token_map: torch.Tensor | None) -> torch.Tensor:
        out = []
        for h, block in enumerate(self.blocks):
            x = hidden
            for layer in block.layers:
                x = x + F.silu(layer(x))
            lm_head = self.lm_head if self.config.get("original_lm_head") else self.lm_heads[h]
            logits = lm_head(x)[..., : self.truncated]
            if token_map is not None:
                full = logits.new_full((*logits.shape[:-1], self.config["vocab_size"]), -torch.inf)
                full[..., token_map] = logits
                logits = full
            out.append(logits)
        return torch.stack(out)


def vllm_name(name: str) -> str:
    """vLLM 0.32's Medusa._remap_old_checkpoint_key: FasterDecoding names -> its own."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
        if "linear" in parts[2:]:
            return f"blocks.{parts[0]}.layers.{parts[1]}.{parts[-1]}"
        return f"lm_heads.{parts[0]}.{'.'.join(parts[2:])}"
    return name


def vllm_load(tensors: dict, config: dict) -> tuple[VllmStyleMedusa, torch.Tensor | None]:
    """vLLM 0.32's load_weights rules: strip `medusa_heads.`, remap old names, token_map only when
    truncated, lm_heads.0 -> lm_head with original_lm_head, lm_head rows sliced by token_map when
    there are more, then the weight loader's shape assertion; anything else is silently ignored
    (so we assert nothing but an unused token_map is)."""
    # vLLM's MedusaConfig.from_pretrained renames keys holding "num" + "heads"/"layers".
    renamed = dict(config)
    for key in list(renamed):
        if "num" in key and "heads" in key:
            renamed["num_heads"] = renamed.pop(key)
        elif "num" in key and "layers" in key:
            renamed["num_hidden_layers"] = renamed.pop(key)
    model = VllmStyleMedusa(renamed)
    params = dict(model.named_parameters())
    truncated = model.truncated < renamed["vocab_size"]
    token_map, weights, ignored = None, {}, []
    for name, tensor in tensors.items():
        name = vllm_name(name.replace("medusa_heads.", ""))
        if name == "token_map":
            if truncated:
                token_map = tensor
            else:
                ignored.append(name)
        elif name in params:
            weights[name] = tensor
        elif renamed.get("original_lm_head") and name == "lm_heads.0.weight":
            weights["lm_head.weight"] = tensor
        else:
            ignored.append(name)
    for name, tensor in weights.items():
        if "lm_head" in name and token_map is not None and tensor.shape[0] > token_map.shape[0]:
            tensor = tensor[token_map]
        assert params[name].shape == tensor.shape, f"vLLM's weight loader asserts on {name}"
        params[name].data.copy_(tensor)
    assert set(ignored) <= {"token_map"}, f"vLLM would silently drop {ignored}"
    assert set(weights) == set(params), f"vLLM would leave {set(params) - set(weights)} uninitialised"
    # vLLM 0.32 makes token_map a parameter that load_weights does not report as loaded, and its
    # default loader then refuses the checkpoint: no truncated vocabulary loads.
    assert not truncated, "vLLM 0.32: 'Following weights were not initialized from checkpoint: {token_map}'"
    return model, token_map


@pytest.mark.parametrize("variant", ["plain", "two_layers", "truncated", "shared", "shared_truncated"])
def test_vllm_export_matches_vllm_loader_rules(variant, tmp_path):
    heads = random_heads(
        num_layers=2 if variant == "two_layers" else 1,
        head_vocab_size=10 if "truncated" in variant else None,
        shared="shared" in variant,
    )
    base_weight = torch.randn(VOCAB, HIDDEN)
    if "shared" in variant:
        heads.init_from_base(base_weight)
    tensors, config = formats.to_vllm(heads, base_weight)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads(json.dumps(config))  # what config.json holds
    assert config["model_type"] == "medusa" and config["architectures"] == ["MedusaModel"]
    assert config["medusa_fc_bias"] is True
    model, token_map = vllm_load(load_file(str(tmp_path / "model.safetensors")), config)
    # vLLM loads the widened rows with its truncation off (vllm_load asserts that) and ignores the
    # token map; the map must still be in the file exactly when the heads are truncated, for our import.
    assert ("token_map" in load_file(str(tmp_path / "model.safetensors"))) == ("truncated" in variant)
    back = readers.from_vllm(load_file(str(tmp_path / "model.safetensors")), config)
    if "shared" in variant:
        back.init_from_base(base_weight)
    assert back.config.shared_lm_head == heads.config.shared_lm_head
    assert_same_state(heads, back)
    with torch.no_grad():
        theirs, ours = model.logits(HIDDEN_STATES, token_map), heads(HIDDEN_STATES)
    if "truncated" in variant:
        # Widened rows: the logits differ outside the map, the drafted token (argmax) does not.
        assert torch.equal(theirs.argmax(-1), ours.argmax(-1))
        # (to rounding: a matmul with more rows may be blocked differently by the BLAS)
        torch.testing.assert_close(theirs[..., heads.token_map], ours[..., heads.token_map], rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(theirs, ours.masked_fill(ours == torch.finfo(torch.float32).min, -torch.inf))


@pytest.mark.parametrize("head_vocab_size", [None, 10])
def test_original_layout_loads_in_vllm_with_its_biases(head_vocab_size, tmp_path):
    """vLLM 0.32 also reads the FasterDecoding layout (method "medusa"): names remapped, counts renamed;
    medusa_fc_bias keeps the biases, which it would otherwise drop."""
    heads = random_heads(head_vocab_size=head_vocab_size)
    tensors, config = formats.to_medusa(heads)
    config = json.loads(json.dumps(config))
    model, token_map = vllm_load(tensors, config)
    assert token_map is None and torch.count_nonzero(model.blocks[0].layers[0].bias) > 0
    with torch.no_grad():
        theirs, ours = model.logits(HIDDEN_STATES, None), heads(HIDDEN_STATES)
    if head_vocab_size is None:
        assert torch.equal(theirs, ours)
    else:  # zero rows: the trained logits are kept, and a zero row wins only over all-negative ones
        torch.testing.assert_close(theirs[..., heads.token_map], ours[..., heads.token_map], rtol=1e-6, atol=1e-5)
        all_negative = (ours.max(-1).values < 0)
        assert torch.equal((theirs.argmax(-1) == ours.argmax(-1)), ~all_negative)


class OriginalResBlock(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x):
        return x + F.silu(self.linear(x))


@pytest.mark.parametrize("num_layers", [1, 2])
def test_medusa_export_matches_trtllm_and_fasterdecoding_rules(num_layers, tmp_path):
    heads = random_heads(num_heads=3, num_layers=num_layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FormatWarning)
        tensors, config = formats.to_medusa(heads, base_model_name_or_path="org/base")
    save_file(tensors, str(tmp_path / "medusa_lm_head.safetensors"))
    state = load_file(str(tmp_path / "medusa_lm_head.safetensors"))
    # TensorRT-LLM's load_medusa_hf: counts from config.json, then exactly these names per head.
    num_heads, layers = config["medusa_num_heads"], config["medusa_num_layers"]
    assert config["base_model_name_or_path"] == "org/base"
    expected = {}
    for h in range(num_heads):
        for l in range(layers):
            expected[f"{h}.{l}.linear.weight"] = (HIDDEN, HIDDEN)
            expected[f"{h}.{l}.linear.bias"] = (HIDDEN,)
        expected[f"{h}.{layers}.weight"] = (VOCAB, HIDDEN)
    assert {n: tuple(t.shape) for n, t in state.items()} == expected
    # FasterDecoding's module tree: ModuleList of Sequential(ResBlock x L, Linear(hidden, vocab, bias=False)).
    # (Distinct ResBlocks here; the reference ties them, which only matters for L > 1.)
    replica = nn.ModuleList(
        nn.Sequential(*[OriginalResBlock(HIDDEN) for _ in range(layers)], nn.Linear(HIDDEN, VOCAB, bias=False))
        for _ in range(num_heads)
    )
    replica.load_state_dict(state, strict=True)
    with torch.no_grad():
        assert torch.equal(torch.stack([head(HIDDEN_STATES) for head in replica]), heads(HIDDEN_STATES))


# ---- importing other people's folders ------------------------------------------------------------


def original_checkpoint(directory, num_heads=5, stated_heads=2, pickle=False, legacy=False):
    """A third-party FasterDecoding-style folder; like the published ones, config.json may lie."""
    torch.manual_seed(3)
    state = {}
    for h in range(num_heads):
        state[f"{h}.0.linear.weight"] = torch.randn(HIDDEN, HIDDEN)
        state[f"{h}.0.linear.bias"] = torch.randn(HIDDEN)
        if not legacy:
            state[f"{h}.1.weight"] = torch.randn(VOCAB, HIDDEN)
    directory.mkdir(parents=True, exist_ok=True)
    if pickle:
        torch.save(state, directory / "medusa_lm_head.pt")
    else:
        save_file(state, str(directory / "medusa_lm_head.safetensors"))
    config = {"medusa_num_heads": stated_heads, "medusa_num_layers": 1, "base_model_name_or_path": "lmsys/vicuna-7b-v1.3"}
    (directory / "config.json").write_text(json.dumps(config))
    return state


@pytest.mark.parametrize("pickle", [False, True])
def test_third_party_checkpoint_with_wrong_head_count_imports_with_warning(pickle, tmp_path):
    state = original_checkpoint(tmp_path / "medusa-vicuna", num_heads=5, stated_heads=2, pickle=pickle)
    with pytest.warns(FormatWarning, match="config.json says 2 heads but the weights hold 5"):
        heads = import_heads(tmp_path / "medusa-vicuna")
    assert heads.num_heads == 5 and heads.config.num_layers == 1
    assert torch.equal(heads.heads[4].lm_head.weight, state["4.1.weight"])
    assert torch.equal(heads.heads[4].blocks[0].linear.bias, state["4.0.linear.bias"])


def test_legacy_layout_reuses_base_lm_head(tmp_path):
    original_checkpoint(tmp_path / "legacy", num_heads=2, stated_heads=2, legacy=True)
    with pytest.raises(ValueError, match="legacy Medusa layout"):
        import_heads(tmp_path / "legacy")
    tensors = importer.read_tensors(tmp_path / "legacy" / "medusa_lm_head.safetensors")
    heads = readers.from_medusa(tensors, {}, vocab_size=VOCAB)
    assert heads.config.shared_lm_head and heads.config.vocab_size == VOCAB


def test_pickle_with_code_is_refused(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    torch.save({"0.0.linear.weight": torch.zeros(2, 2), "payload": Exception("runs on unpickle")},
               directory / "medusa_lm_head.pt")
    with pytest.raises(ValueError, match="cannot read weights"):
        import_heads(directory)


def test_vllm_biases_without_fc_bias_flag_are_zeroed_like_vllm_does():
    heads = random_heads()
    tensors, config = formats.to_vllm(heads)
    config["medusa_fc_bias"] = False
    with pytest.warns(FormatWarning, match="vLLM ignores"):
        back = readers.from_vllm(tensors, config)
    assert torch.count_nonzero(back.heads[0].blocks[0].linear.bias) == 0


def test_full_medusa2_model_folder_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=VOCAB)
    config.medusa_num_heads, config.medusa_num_layers = 2, 1  # as Medusa-2 training saves it
    LlamaForCausalLM(config).save_pretrained(tmp_path / "medusa2")
    with pytest.raises(ValueError, match="full Medusa-2 model"):
        import_heads(tmp_path / "medusa2")
    # A plain model folder, and one whose config was stripped of model_type, are refused too.
    del config.medusa_num_heads, config.medusa_num_layers
    LlamaForCausalLM(config).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="full model"):
        import_heads(tmp_path / "plain")
    raw = json.loads((tmp_path / "plain" / "config.json").read_text())
    raw.pop("model_type")
    (tmp_path / "plain" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="full model"):
        importer.detect_format(tmp_path / "plain")


def test_unknown_folder_gets_a_clear_message(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not a Medusa heads folder"):
        import_heads(tmp_path)
