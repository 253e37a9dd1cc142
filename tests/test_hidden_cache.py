"""Hidden-state cache: contents, size, crash-safe resume, model checks, and offline == online training."""

import json
import shutil

import pytest
import torch
from helpers import learnable_data, save_tiny_model, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

import medusaforge.commands.cache as hidden_cache
from medusaforge.cli import main
from medusaforge.commands.cache import shard_plan
from medusaforge.models import read_lm_head_weight
from medusaforge.training.hidden_cache import HiddenCache
from medusaforge.models import final_hidden_states


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(tmp_path / "medusaforge-cache"))


def make_cache(model_dir, data, out, *extra):
    # 0.01 MB of bf16 hidden states (hidden 64) is 81 tokens: several shards from tiny data.
    argv = ["cache", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--batch-size", "4",
            "--shard-mb", "0.01", "--dtype", "fp32", *extra]
    assert main(argv) == 0


def test_shard_plan_cuts_at_batch_boundaries_after_enough_tokens():
    assert shard_plan([5, 5, 5, 5, 5], batch_size=2, shard_tokens=12) == [(0, 4), (4, 5)]
    assert shard_plan([5, 5, 5], batch_size=1, shard_tokens=1) == [(0, 1), (1, 2), (2, 3)]
    assert shard_plan([3], batch_size=8, shard_tokens=100) == [(0, 1)]


def test_cache_holds_the_base_hidden_states_ids_and_mask(tmp_path, tiny_model_dir, isolated_cache, capsys):
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=12)
    make_cache(tiny_model_dir, data, tmp_path / "cache", "--cache-dtype", "fp32")
    cache = HiddenCache(tmp_path / "cache")
    assert len(cache.shards) > 1 and len(cache) == 12
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for index in (0, 5, 11):
        ids, mask = cache.data.example(index)
        with torch.no_grad():
            expected = final_hidden_states(base, ids[None])[0]
        assert torch.allclose(cache.hidden(index), expected, atol=1e-5)
        assert mask.any() and not mask[0]
    # bf16 storage: hidden_size * 2 bytes per token plus 5 (int32 id, uint8 mask), 8 (the base's
    # int32 argmax and fp32 logsumexp) and the headers.
    make_cache(tiny_model_dir, data, tmp_path / "cache16")
    summary = json.loads((tmp_path / "cache16" / "index.json").read_text())
    tokens = sum(s["num_tokens"] for s in summary["shards"])
    size = sum((tmp_path / "cache16" / s["file"]).stat().st_size for s in summary["shards"])
    assert 64 * 2 + 5 + 8 <= size / tokens < 64 * 2 + 5 + 8 + 8
    assert "bytes/token" in capsys.readouterr().out


def test_interrupted_cache_resumes_to_identical_files(tmp_path, tiny_model_dir, isolated_cache, monkeypatch):
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=16)
    make_cache(tiny_model_dir, data, tmp_path / "whole")
    shards = sorted(p.name for p in (tmp_path / "whole").glob("shard-*"))
    assert len(shards) >= 3

    # Die right after the second shard file is renamed, before the index lists it.
    real_write_index, calls = hidden_cache.write_index, []

    def dying_write_index(directory, index):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        real_write_index(directory, index)

    monkeypatch.setattr(hidden_cache, "write_index", dying_write_index)
    with pytest.raises(KeyboardInterrupt):
        make_cache(tiny_model_dir, data, tmp_path / "killed")
    monkeypatch.setattr(hidden_cache, "write_index", real_write_index)
    # A half-written temporary file, as a SIGKILL during save_file leaves it; the reader refuses
    # the incomplete cache rather than training on part of the data.
    (tmp_path / "killed" / ".shard-00002.safetensors.tmp-1").write_bytes(b"half")
    with pytest.raises(ValueError, match="incomplete"):
        HiddenCache(tmp_path / "killed")
    make_cache(tiny_model_dir, data, tmp_path / "killed")
    for name in shards + ["index.json"]:
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_cache_and_model_mismatches_are_refused(tmp_path, tiny_model_dir, isolated_cache, capsys):
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=8)
    make_cache(tiny_model_dir, data, tmp_path / "cache")
    other = save_tiny_model(tmp_path / "other", seed=1)
    # Another model into the same cache folder: refused, nothing touched.
    with pytest.raises(FileExistsError, match="other inputs"):
        hidden_cache.run(hidden_cache.CacheConfig(model=str(other), data=data, out=tmp_path / "cache", shard_mb=0.01, batch_size=4, dtype="fp32"))
    argv = ["train", "--cache", str(tmp_path / "cache"), "--model", str(other), "--out", str(tmp_path / "run"),
            "--max-steps", "1", "--progress", "false"]
    before = {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    capsys.readouterr()
    assert main(argv) == 1
    # Refused for the right reason, naming both models, before anything was trained or written.
    error = capsys.readouterr().err
    assert error.startswith("medusaforge train: error: ") and "the cache was made from model" in error, error
    assert f"--model {other} has fingerprint" in error, error
    assert not (tmp_path / "run" / "heads").exists() and not (tmp_path / "run" / "summary.json").exists()
    assert {p: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    with pytest.raises(ValueError, match="cache was made from model"):
        HiddenCache(tmp_path / "cache").check_model(other)


def test_lm_head_is_read_from_the_files_for_tied_and_untied_models(tmp_path):
    untied = save_tiny_model(tmp_path / "untied")
    base = AutoModelForCausalLM.from_pretrained(untied)
    assert torch.equal(read_lm_head_weight(untied), base.lm_head.weight)
    tokenizer = tiny_tokenizer()
    tied = tiny_llama(len(tokenizer))
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    tied.save_pretrained(tmp_path / "tied")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in handle.keys()
    assert torch.equal(read_lm_head_weight(tmp_path / "tied"), tied.model.embed_tokens.weight)


def train_losses(argv_extra, tmp_path, name):
    out = tmp_path / name
    argv = ["train", "--out", str(out), "--num-heads", "3", "--batch-size", "4", "--max-steps", "6",
            "--eval-fraction", "0.25", "--progress", "false", "--dtype", "fp32", *argv_extra]
    assert main(argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "summary.json").read_text())


def test_offline_training_gives_the_online_losses(tmp_path, tiny_model_dir, isolated_cache):
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=16)
    make_cache(tiny_model_dir, data, tmp_path / "cache32", "--cache-dtype", "fp32")
    make_cache(tiny_model_dir, data, tmp_path / "cache16")
    online, online_summary = train_losses(["--model", str(tiny_model_dir), "--data", str(data)], tmp_path, "online")
    offline, offline_summary = train_losses(["--model", str(tiny_model_dir), "--cache", str(tmp_path / "cache32")], tmp_path, "offline")
    offline16, _ = train_losses(["--model", str(tiny_model_dir), "--cache", str(tmp_path / "cache16")], tmp_path, "offline16")
    assert len(online) == len(offline) == 6
    for a, b, c in zip(online, offline, offline16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["head_top1"] == pytest.approx(a["head_top1"], abs=1e-6)
        assert c["loss"] == pytest.approx(a["loss"], rel=2e-2)  # bf16 storage rounds the inputs
    assert offline_summary["held_out"]["loss"] == pytest.approx(online_summary["held_out"]["loss"], rel=1e-5)
    # The offline heads carry the base's fingerprint, so they load against the base like online ones.
    from medusaforge.drafters.medusa_heads import load_heads

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_heads(tmp_path / "offline" / "heads", base=base)
    shutil.rmtree(tmp_path / "cache16")


def test_held_out_cache_is_the_whole_held_out_set_and_all_of_the_training_data_trains(tmp_path, tiny_model_dir, isolated_cache):
    from medusaforge.drafters.medusa_heads import load_heads
    from medusaforge.training.common import evaluate_heads
    from medusaforge.training.sources import OfflineBatches

    make_cache(tiny_model_dir, learnable_data(tmp_path / "train.jsonl", num_conversations=12), tmp_path / "train-cache")
    make_cache(tiny_model_dir, learnable_data(tmp_path / "held.jsonl", num_conversations=5, seed=7), tmp_path / "held-cache")
    _, summary = train_losses(["--model", str(tiny_model_dir), "--cache", str(tmp_path / "train-cache"),
                               "--held-out-cache", str(tmp_path / "held-cache")], tmp_path, "run")
    # --eval-fraction 0.25 is set, but a held-out cache replaces the split: all 12 train, all 5 held out
    assert (summary["train_conversations"], summary["eval_conversations"]) == (12, 5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    heads = load_heads(tmp_path / "run" / "heads", base=base).eval()
    expected = evaluate_heads(heads, OfflineBatches(HiddenCache(tmp_path / "held-cache")), list(range(5)), 4, "cpu",
                              torch.autocast("cpu", enabled=False), 512)
    assert summary["held_out"]["top1"] == pytest.approx(expected["top1"]) and summary["held_out"]["loss"] == pytest.approx(expected["loss"])


def test_eagle3_features_are_the_base_hidden_states_at_the_chosen_layers(tmp_path, tiny_model_dir, isolated_cache, capsys):
    data = learnable_data(tmp_path / "data.jsonl", num_conversations=6)
    make_cache(tiny_model_dir, data, tmp_path / "cache", "--cache-dtype", "fp32", "--feature-layers", "0", "2", "1")
    assert "features of layers [0, 2, 1] 768" in capsys.readouterr().out  # 3 x 64 values x 4 bytes per token
    cache = HiddenCache(tmp_path / "cache")
    assert cache.feature_layers == (0, 2, 1)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for index in (0, 5):
        ids, _ = cache.data.example(index)
        with torch.no_grad():
            states = base.model(input_ids=ids[None], output_hidden_states=True).hidden_states
        expected = torch.cat([states[0][0], states[2][0], states[1][0]], dim=-1)
        assert cache.features(index).shape == (len(ids), 3 * 64)
        assert torch.allclose(cache.features(index), expected, atol=1e-5)
        assert torch.allclose(cache.hidden(index), states[-1][0], atol=1e-5)  # the final state is still there
    # A Medusa-only cache says what to do instead of failing on a missing tensor.
    make_cache(tiny_model_dir, data, tmp_path / "plain")
    with pytest.raises(ValueError, match="--eagle3-features"):
        HiddenCache(tmp_path / "plain").features(0)
    # The default layers (2, L//2, L-3) do not exist in a 2-layer base: refused by name.
    assert main(["cache", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "bad"),
                 "--eagle3-features", "--dtype", "fp32"]) == 1
    assert "feature layers must be three hidden_states indices" in capsys.readouterr().err
