"""EAGLE-3 training: the loss and masks on hand-worked examples, the draft vocabulary maps, and the
recipe end to end on a tiny model (loss goes down, every parameter moves, held-out top-1 per step,
resume after an interruption is bitwise the uninterrupted run, bad input fails clearly)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from medusaforge.cli import main
from medusaforge.drafters.draft_vocab import prediction_counts, select_draft_vocab, token_map_of, vocab_maps
from medusaforge.drafters.eagle3 import Eagle3Draft, draft_config_from_base, load_draft
from medusaforge.training import eagle3 as recipe
from medusaforge.training.eagle3_loss import eagle3_losses, plain_step_loss, soft_cross_entropy, step_positions, step_weights
from tests.helpers import learnable_data, run_torchrun, save_tiny_model, tiny_llama, tiny_tokenizer, write_jsonl


def test_soft_cross_entropy_on_hand_worked_logits():
    # Target softmax([0, ln 3]) = [1/4, 3/4].
    target = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    draft = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])
    expected = torch.tensor([math.log(2.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))])
    torch.testing.assert_close(soft_cross_entropy(draft, target), expected)
    torch.testing.assert_close(plain_step_loss(draft, target), expected.sum())
    assert step_weights(3) == [1.0, 0.8, 0.8**2]


def test_step_positions_shift_the_unshifted_mask_once():
    mask = torch.tensor([[0, 0, 1, 1, 0, 1]], dtype=torch.bool)
    # Step k counts position i when token i+2+k is an assistant token.
    assert step_positions(mask, 0).int().tolist() == [[1, 1, 0, 1, 0, 0]]
    assert step_positions(mask, 1).int().tolist() == [[1, 0, 1, 0, 0, 0]]
    assert step_positions(mask, 5).int().tolist() == [[0, 0, 0, 0, 0, 0]]


def test_eagle3_losses_equal_a_plain_per_position_loop():
    base = tiny_llama(64, hidden_size=32)
    torch.manual_seed(0)
    draft = Eagle3Draft(draft_config_from_base(base.config, 16, (0, 1, 2)), base.get_input_embeddings())
    token_map = torch.arange(16) * 4
    draft.set_vocab(*vocab_maps(token_map, 64))
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.rand(2, 7) > 0.3
    hiddens = draft.unroll(ids, torch.randn(2, 7, 32), 3)
    full_logits = torch.randn(2, 7, 64)
    result = eagle3_losses(draft, hiddens, full_logits[..., token_map], full_logits.argmax(-1), mask)
    for k in range(3):
        loss, hits, count = torch.zeros(()), 0, 0
        for b in range(2):
            for i in range(7 - 2 - k):
                if mask[b, i + 2 + k]:
                    logits = draft.logits(hiddens[k][b, i])
                    loss = loss + plain_step_loss(logits[None], full_logits[b, i + 1 + k, token_map][None])
                    hits += int(token_map[logits.argmax()] == full_logits[b, i + 1 + k].argmax())
                    count += 1
        torch.testing.assert_close(result.loss_sums[k], loss)
        assert result.top1[k] == hits and result.counts[k] == count


def test_draft_vocab_round_trip_and_choice():
    token_map = torch.tensor([1, 4, 5, 9])
    d2t, t2d = vocab_maps(token_map, 12)
    assert d2t.tolist() == [1, 3, 3, 6]
    assert torch.equal(token_map_of(d2t), token_map)
    assert torch.equal(t2d.nonzero().flatten(), token_map)
    assert torch.equal(t2d[token_map_of(d2t)], torch.ones(4, dtype=torch.bool))
    # Predictions at t are counted where token t+1 is an assistant token.
    argmax = torch.tensor([[3, 3, 7, 2]])
    mask = torch.tensor([[0, 1, 1, 0]], dtype=torch.bool)
    assert prediction_counts(argmax, mask, 8).tolist() == [0, 0, 0, 2, 0, 0, 0, 0]
    # Most predicted first; ties by target frequency, then by lower id.
    predicted = torch.tensor([0, 5, 0, 5, 1, 0])
    targets = torch.tensor([0, 0, 9, 1, 0, 3])
    assert select_draft_vocab(predicted, targets, 3).tolist() == [1, 3, 4]
    assert select_draft_vocab(predicted, targets, 4).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="ascending"):
        vocab_maps(torch.tensor([3, 1]), 5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle3")
    return save_tiny_model(root / "model"), learnable_data(root / "data.jsonl", num_conversations=24), root


def config_for(setup, out, **overrides):
    model, data, _ = setup
    values = dict(model=str(model), data=data, out=out, num_steps=3, draft_vocab=128, vocab_examples=8,
                  feature_layers=[0, 1, 2], max_length=64, batch_size=4, max_steps=8, lr=3e-3,
                  eval_fraction=0.2, device="cpu", dtype="fp32", progress=False)
    values.update(overrides)
    return recipe.Eagle3Config(**values)


def test_train_end_to_end_loss_goes_down_and_every_parameter_moves(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(setup[2] / "cache"))
    out = tmp_path / "run"
    model, data, _ = setup
    # The real entry point: the recipe registry picks Eagle3Config from --method.
    assert main(["train", "--method", "eagle3", "--model", str(model), "--data", str(data), "--out", str(out),
                 "--num-steps", "3", "--draft-vocab", "128", "--vocab-examples", "8", "--feature-layers", "0", "1", "2",
                 "--max-length", "64", "--batch-size", "4", "--max-steps", "16", "--lr", "3e-3", "--eval-fraction", "0.2",
                 "--device", "cpu", "--dtype", "fp32", "--progress", "false", "--eval-every", "8"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records, last = [line for line in lines[:-1] if "loss" in line], lines[-1]
    assert len(records) == 16 and len(records[0]["step_top1"]) == 3
    # --eval-every 8: one interim held-out line, after step 8 (the final one comes last).
    interim = [line for line in lines[:-1] if "held_out_top1" in line]
    assert [line["step"] for line in interim] == [8] and len(interim[0]["held_out_top1"]) == 3
    assert sum(r["loss"] for r in records[-3:]) < sum(r["loss"] for r in records[:3])
    held_out = json.loads((out / "summary.json").read_text())["held_out"]
    assert len(held_out["top1"]) == 3 and held_out["num_tokens"][0] > 0
    assert last == {"step": 16, "held_out_top1": held_out["top1"], "held_out_loss": held_out["loss"]}
    assert summary["trainable_parameters"] > 0 and summary["feature_layers"] == [0, 1, 2]
    assert summary["peak_rss_bytes"] > 10 * 2**20 and summary["steps"] == summary["planned_steps"] == 16
    model = tiny_llama(len(tiny_tokenizer()))
    trained = load_draft(out / "draft", model.get_input_embeddings())
    assert trained.config.draft_vocab_size == 128 and int(trained.t2d.sum()) == 128
    checkpoint = load_file(str(sorted((out / "checkpoints").iterdir())[-1] / "heads" / "model.safetensors"))
    assert all(torch.equal(checkpoint[name], t) for name, t in trained.state_dict().items())
    # Every trainable parameter moved from its initial value. A one-step run at lr 1e-30 keeps the
    # seeded init exactly (an Adam step of ~1e-30 vanishes against fp32 weights; lr 0 is refused).
    initial_run = recipe.train(config_for(setup, tmp_path / "zero", max_steps=1, lr=1e-30))
    initial = load_draft(tmp_path / "zero" / "draft", model.get_input_embeddings())
    for name, parameter in trained.named_parameters():
        assert not torch.equal(parameter, initial.state_dict()[name]), f"{name} did not move"
    assert torch.equal(trained.d2t, initial.d2t), "the draft vocabulary depends only on the data and the seed"
    assert initial_run["steps"] == 1


@pytest.mark.parametrize("batching", [{}, {"batch_tokens": 128}], ids=["conversations", "tokens"])
def test_resume_after_an_interruption_is_bitwise_the_uninterrupted_run(setup, tmp_path, monkeypatch, batching):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(setup[2] / "cache"))
    recipe.train(config_for(setup, tmp_path / "straight", save_every=2, **batching))

    calls = {"n": 0}
    real_losses = recipe.eagle3_losses

    def dies_in_step_five(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill in step 5")
        return real_losses(*args, **kwargs)

    monkeypatch.setattr(recipe, "eagle3_losses", dies_in_step_five)
    with pytest.raises(KeyboardInterrupt):
        recipe.train(config_for(setup, tmp_path / "broken", save_every=2, **batching))
    monkeypatch.setattr(recipe, "eagle3_losses", real_losses)
    recipe.train(config_for(setup, tmp_path / "broken", save_every=2, resume="auto", **batching))

    def curve(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        for record in records:
            record.pop("tokens_per_s", None)  # wall clock: the figures allowed to differ
            record.pop("seconds", None)
        return records

    assert curve(tmp_path / "broken") == curve(tmp_path / "straight")
    straight = load_file(str(tmp_path / "straight" / "draft" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "draft" / "model.safetensors"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_resume_auto_skips_a_damaged_newest_checkpoint_and_refuses_a_changed_schedule(setup, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(setup[2] / "cache"))
    out = tmp_path / "run"
    recipe.train(config_for(setup, out, max_steps=6, save_every=2, keep_last=3))
    newest = sorted((out / "checkpoints").iterdir())[-1]
    (newest / "heads" / "model.safetensors").write_bytes(b"not a safetensors file")
    capsys.readouterr()
    summary = recipe.train(config_for(setup, out, max_steps=6, save_every=2, keep_last=3, resume="auto"))
    log = capsys.readouterr().err
    assert "skipping damaged checkpoint" in log and "step-000006" in log
    assert "resumed from" in log and "step-000004 at step 4" in log and summary["steps"] == 6
    with pytest.raises(ValueError, match="different data order or LR schedule"):
        recipe.train(config_for(setup, out, max_steps=7, save_every=2, resume="auto"))


def test_bad_input_fails_with_a_clear_error(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(setup[2] / "cache"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "{not json"])
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        recipe.train(config_for(setup, tmp_path / "out", data=bad))
    with pytest.raises(ValueError, match=r"in \[0, 2\]"):
        recipe.train(config_for(setup, tmp_path / "out2", feature_layers=[0, 1, 5]))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        recipe.train(config_for(setup, tmp_path / "full"))


DDP_SCRIPT = """
import sys
from pathlib import Path
from medusaforge.training.eagle3 import Eagle3Config, train
model, data, out = sys.argv[1:4]
train(Eagle3Config(model=model, data=Path(data), out=Path(out), num_steps=3, draft_vocab=128, vocab_examples=8,
                   feature_layers=[0, 1, 2], max_length=64, batch_size=4, grad_accum=2, max_steps=3, lr=3e-3,
                   eval_fraction=0.2, device="cpu", dtype="fp32", progress=False))
"""


def test_two_gloo_processes_match_one_process(setup, tmp_path, monkeypatch):
    import os

    model, data, root = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    script = tmp_path / "run_eagle3.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    outs = {}
    for procs in (1, 2):
        outs[procs] = tmp_path / f"world{procs}"
        finished = run_torchrun([str(script), str(model), str(data), str(outs[procs])], env, out=outs[procs], nproc=procs)
        assert finished.returncode == 0, finished.stderr[-3000:]
    one, two = ([json.loads(line) for line in (outs[p] / "metrics.jsonl").read_text().splitlines()][:-1] for p in (1, 2))
    assert [m["step"] for m in two] == [1, 2, 3]
    for a, b in zip(one, two):
        # Same global batch and normalisation; only the order of float sums differs.
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["step_top1"] == pytest.approx(a["step_top1"], abs=1e-6)
    first = load_file(str(outs[1] / "draft" / "model.safetensors"))
    second = load_file(str(outs[2] / "draft" / "model.safetensors"))
    for name, tensor in first.items():
        # Adam divides by sqrt(v): a gradient entry near zero turns a float-order difference of
        # ~1e-9 into ~1e-5 after three steps of lr 3e-3 (one entry in 12,288 seen), hence atol 1e-4.
        torch.testing.assert_close(second[name], tensor, rtol=1e-4, atol=1e-4)
    summaries = [json.loads((outs[p] / "summary.json").read_text())["held_out"] for p in (1, 2)]
    assert summaries[1]["top1"] == pytest.approx(summaries[0]["top1"], abs=1e-6)


def test_offline_from_the_cache_trains_like_online(setup, tmp_path, monkeypatch):
    model, data, root = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    assert main(["cache", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "hidden"), "--max-length", "64",
                 "--eagle3-features", "--feature-layers", "0", "1", "2", "--cache-dtype", "fp32", "--dtype", "fp32",
                 "--device", "cpu"]) == 0
    recipe.train(config_for(setup, tmp_path / "online", max_steps=4))
    recipe.train(config_for(setup, tmp_path / "offline", max_steps=4, data=None, cache=tmp_path / "hidden", feature_layers=None))

    def metrics(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][:-1]  # the last: held-out

    for online, offline in zip(metrics(tmp_path / "online"), metrics(tmp_path / "offline"), strict=True):
        assert offline["loss"] == pytest.approx(online["loss"], rel=1e-4)
        assert offline["step_top1"] == pytest.approx(online["step_top1"], abs=1e-6)
    summaries = [json.loads((tmp_path / name / "summary.json").read_text()) for name in ("online", "offline")]
    assert summaries[1]["hidden_states"] != "online" and summaries[1]["feature_layers"] == [0, 1, 2]
    assert summaries[1]["held_out"]["top1"] == pytest.approx(summaries[0]["held_out"]["top1"], abs=1e-6)
    # A Medusa-only cache (no feature layers) is refused with the command that makes a usable one.
    assert main(["cache", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "medusa-only"),
                 "--max-length", "64", "--device", "cpu"]) == 0
    with pytest.raises(ValueError, match="--eagle3-features"):
        recipe.train(config_for(setup, tmp_path / "refused", data=None, cache=tmp_path / "medusa-only", feature_layers=None))
