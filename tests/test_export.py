"""`medusaforge export` end to end: CLI, files written, model card, refusals, loading the result back."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import assert_same_state

from medusaforge.interop import importer, layouts as formats
from medusaforge.cli import main
from medusaforge.drafters.medusa_heads import MedusaHeads
from medusaforge.interop.importer import import_heads

HIDDEN, VOCAB = 16, 48


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved as a Hugging Face folder, standing in for the base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=VOCAB, tie_word_embeddings=False)
    directory = tmp_path_factory.mktemp("base") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def base(base_dir):
    from medusaforge.models import load_base_model

    return load_base_model(base_dir, check=False)


def trained_heads(base, base_dir, tmp_path, shared=False, head_vocab_size=None, num_heads=3) -> tuple[MedusaHeads, Path]:
    from medusaforge.models import lm_head_of

    heads = MedusaHeads(HIDDEN, VOCAB, num_heads, 1, shared_lm_head=shared, head_vocab_size=head_vocab_size,
                        base_model=str(base_dir))
    if head_vocab_size is not None:
        heads.token_map.copy_(torch.randperm(VOCAB)[:head_vocab_size])
    heads.init_from_base(lm_head_of(base).weight)
    for name, parameter in heads.named_parameters():
        if "blocks" in name:  # as if trained: nonzero ResBlocks
            parameter.data.normal_(std=0.1)
    return heads, heads.save(tmp_path / "heads")


def hidden_states(hidden_size: int = HIDDEN) -> torch.Tensor:
    return torch.randn(2, 7, hidden_size, generator=torch.Generator().manual_seed(5))


def assert_widened_keeps_trained_rows_and_top1(heads: MedusaHeads, back: MedusaHeads, hidden: torch.Tensor) -> None:
    """The original layout has no token map, so truncated heads come back widened to the full
    vocabulary with zero rows outside the map. What that layout promises: every trained tensor kept
    bit for bit (the ResBlocks, and each projection's rows at the map), and each head's top-1 kept
    wherever its best trained logit is above 0 (a zero row outranks only all-negative logits)."""
    token_map, vocab = heads.token_map, heads.config.vocab_size
    assert token_map is not None and back.token_map is None and back.config.head_vocab_size == vocab
    trained, widened = heads.state_dict(), back.state_dict()
    assert widened.keys() == trained.keys() - {"token_map"}
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[token_map] = False
    for name, tensor in trained.items():
        if name == "token_map":
            continue
        if name.endswith("lm_head.weight"):
            assert widened[name].shape == (vocab, tensor.shape[1]), name
            assert not widened[name][outside].any(), f"{name}: rows outside the map are not zero"
            kept = widened[name][token_map]
        else:
            kept = widened[name]
        assert kept.dtype == tensor.dtype and torch.equal(kept, tensor), f"{name}: trained rows changed"
    with torch.no_grad():
        ours, theirs = heads(hidden), back(hidden)
    assert (ours.max(-1).values > 0).all()  # so a kept top-1 is what the layout promises everywhere here
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


@pytest.mark.parametrize("fmt", ["vllm", "medusa"])
def test_export_cli_writes_engine_folder_that_loads_back_bit_identical(fmt, base, base_dir, tmp_path):
    heads, heads_dir = trained_heads(base, base_dir, tmp_path)
    out = tmp_path / f"out-{fmt}"
    assert main(["export", "--heads", str(heads_dir), "--format", fmt, "--out", str(out)]) == 0
    weights = formats.VLLM_WEIGHTS_FILE if fmt == "vllm" else formats.MEDUSA_WEIGHTS_FILE
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", "README.md", weights])
    assert importer.detect_format(out) == fmt
    back = import_heads(out, base)  # what eval/generate/train --init-heads call
    assert_same_state(heads, back)
    assert torch.equal(heads(hidden_states()), back(hidden_states()))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the staging folder is gone


def test_model_card_has_measurements_and_both_engines_commands(base, base_dir, tmp_path):
    _, heads_dir = trained_heads(base, base_dir, tmp_path)
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"accept_length": 2.31, "speedup": 1.84, "num_prompts": 20, "identical": True,
                                     "per_head_acceptance": [0.6, 0.3, 0.125], "prompts_detail": [{"x": 1}]}))
    out = tmp_path / "out"
    assert main(["export", "--heads", str(heads_dir), "--format", "medusa", "--out", str(out),
                 "--eval-json", str(eval_json), "--write-pt", "--data", "self-distilled UltraChat"]) == 0
    card = (out / "README.md").read_text()
    for text in ("2.310", "1.840", "| 20 |", "| True |", "0.600, 0.300, 0.125", "self-distilled UltraChat", str(base_dir),
                 f"--medusa_model_dir {out}", "--num_medusa_heads 3", "--speculative_decoding_mode medusa",
                 "--format vllm", "TensorRT-LLM removed Medusa in 2026", "tree/v0.21.0/examples/medusa"):
        assert text in card, text
    assert (out / formats.MEDUSA_PICKLE_FILE).is_file()
    vllm_card = (tmp_path / "v" / "README.md")
    assert main(["export", "--heads", str(heads_dir), "--out", str(tmp_path / "v"), "--num-speculative-tokens", "2"]) == 0
    text = vllm_card.read_text()
    assert f'"method": "medusa", "model": "{tmp_path / "v"}", "num_speculative_tokens": 2' in text
    assert "Not measured here" in text


def test_pickle_only_folder_imports_the_same_heads(base, base_dir, tmp_path):
    heads, heads_dir = trained_heads(base, base_dir, tmp_path)
    out = tmp_path / "out"
    assert main(["export", "--heads", str(heads_dir), "--format", "medusa", "--out", str(out), "--write-pt"]) == 0
    (out / formats.MEDUSA_WEIGHTS_FILE).unlink()
    assert torch.equal(import_heads(out)(hidden_states()), heads(hidden_states()))


def test_non_empty_output_is_refused_unless_overwrite(base, base_dir, tmp_path, capsys):
    _, heads_dir = trained_heads(base, base_dir, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["export", "--heads", str(heads_dir), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["export", "--heads", str(heads_dir), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert main(["export", "--heads", str(heads_dir), "--out", str(heads_dir), "--overwrite"]) == 1


def test_shared_lm_head_export_reads_the_base_and_round_trips(base, base_dir, tmp_path):
    heads, heads_dir = trained_heads(base, base_dir, tmp_path, shared=True)
    out = tmp_path / "out"
    # No --model: the heads' recorded base_model (the tiny folder) is loaded for its lm_head.
    assert main(["export", "--heads", str(heads_dir), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["original_lm_head"] is True
    back = import_heads(out, base)
    assert back.config.shared_lm_head
    assert torch.equal(heads(hidden_states()), back(hidden_states()))


@pytest.mark.parametrize("fmt", ["vllm", "medusa"])
def test_truncated_vocab_export_widens_rows_and_reports_top1_on_cached_hidden_states(fmt, tmp_path, capsys):
    """Both layouts need full-vocabulary rows per head; export widens them (no base model needed)
    and, given a hidden-state cache, measures and records how often each head's top-1 is kept."""
    from helpers import learnable_data, save_tiny_model

    model_dir = save_tiny_model(tmp_path / "tiny")
    cache = tmp_path / "cache"
    assert main(["cache", "--model", str(model_dir), "--data", str(learnable_data(tmp_path / "d.jsonl")),
                 "--out", str(cache), "--dtype", "fp32"]) == 0
    from medusaforge.models import lm_head_of, load_base_model

    base = load_base_model(model_dir, check=False)
    vocab, hidden = lm_head_of(base).weight.shape
    torch.manual_seed(0)
    heads = MedusaHeads(hidden, vocab, 2, 1, head_vocab_size=60, base_model=str(model_dir))
    heads.token_map.copy_(torch.sort(torch.randperm(vocab)[:60]).values)
    heads.init_from_base(lm_head_of(base).weight)
    heads_dir = heads.save(tmp_path / "heads")
    capsys.readouterr()
    out = tmp_path / f"out-{fmt}"
    assert main(["export", "--heads", str(heads_dir), "--format", fmt, "--out", str(out),
                 "--hidden-cache", str(cache)]) == 0
    printed = capsys.readouterr().out
    fill = "shadow" if fmt == "vllm" else "zero"
    assert f"top-1 kept by the {fill}-filled full-vocabulary rows" in printed
    config = json.loads((out / "config.json").read_text())
    agreement = config["medusaforge"]["top1_agreement"]
    assert agreement["fill"] == fill and len(agreement["per_head"]) == 2 and agreement["num_tokens"] > 100
    assert f"head 0 {100 * agreement['per_head'][0]:.2f}%" in printed
    assert "Measured top-1 agreement" in (out / "README.md").read_text()
    back = import_heads(out, base)
    if fmt == "vllm":  # the token map rides along, so the trained heads come back bit for bit
        assert_same_state(heads, back)
    else:  # the original layout has no token map: what comes back is what engines run
        assert_widened_keeps_trained_rows_and_top1(heads, back, hidden_states(hidden))
    # Without a cache the export still works and says what it did not measure.
    assert main(["export", "--heads", str(heads_dir), "--format", fmt, "--out", str(tmp_path / "again")]) == 0
    assert "pass --hidden-cache" in capsys.readouterr().out


def test_import_checks_shapes_against_the_base(base, base_dir, tmp_path):
    wrong = MedusaHeads(HIDDEN + 8, VOCAB, 2, 1)
    tensors, config = formats.to_vllm(wrong)
    directory = tmp_path / "wrong"
    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="hidden_size 24 != base 16"):
        import_heads(directory, base)


@pytest.mark.slow
@pytest.mark.parametrize("head_vocab_size", [None, 8192], ids=["full-vocab", "truncated"])
@pytest.mark.parametrize("fmt", ["vllm", "medusa"])
def test_smollm2_shaped_heads_round_trip(fmt, head_vocab_size, tmp_path):
    """Random heads of SmolLM2's shape (576 x 49152; truncated to 8,192 tokens as `make demo` trains
    them), built here so the result never depends on what a user has trained. They come back bit
    for bit, except truncated heads in the original layout, which come back widened."""
    from medusaforge.commands.export import ExportConfig, run

    torch.manual_seed(0)
    heads = MedusaHeads(576, 49152, 4, 1, head_vocab_size=head_vocab_size, base_model="smollm2-135m-instruct")
    for parameter in heads.parameters():
        parameter.data.normal_(std=0.02)
    if head_vocab_size is not None:
        heads.token_map.copy_(torch.sort(torch.randperm(49152)[:head_vocab_size]).values)
    heads_dir = heads.save(tmp_path / "heads")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", formats.FormatWarning)
        run(ExportConfig(heads=str(heads_dir), format=fmt, out=str(tmp_path / "out")))
    back = import_heads(tmp_path / "out")
    hidden = torch.randn(1, 8, 576, generator=torch.Generator().manual_seed(0))
    if fmt == "medusa" and head_vocab_size is not None:
        assert_widened_keeps_trained_rows_and_top1(heads, back, hidden)
        return
    assert_same_state(heads, back)
    with torch.no_grad():
        assert torch.equal(heads(hidden), back(hidden))


def test_model_card_for_the_builtin_base_points_engines_at_the_converted_folder():
    from medusaforge.drafters.medusa_heads import HeadsConfig
    from medusaforge.interop.model_card import model_card

    card = model_card(HeadsConfig(576, 49152, 4, 1, base_model="smollm2-135m-instruct"), "vllm", "out")
    assert "convert_builtin('smollm2-135m-instruct')" in card
    assert '"num_speculative_tokens": 4' in card
