"""FSDP2 of the frozen base (`--fsdp-base`) under torchrun: 2 gloo processes on CPU train exactly like
one process, for both recipes that offer it.

- EAGLE-3: the base's decoder layers are sharded while the draft keeps embedding its tokens with the
  base embedding (left whole on every rank) and the targets come from the whole lm_head.
- Medusa-1 with `--shared-lm-head`: every head projects with the base lm_head, which must stay whole
  while the decoder is sharded (tests/test_distributed.py covers the own-projection heads).
Same global batches, same normalisation: only the order of float sums differs between the runs.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_torchrun, save_tiny_model, small_data
from safetensors.torch import load_file

from medusaforge.cli import main

RECIPES = {
    # recipe -> (extra flags, weights file, per-step loss key in metrics.jsonl)
    "eagle3": (["--method", "eagle3", "--num-steps", "2", "--draft-vocab", "64", "--vocab-examples", "8",
                "--feature-layers", "0", "1", "2"], "draft/model.safetensors", "step_loss"),
    "medusa1": (["--num-heads", "2", "--shared-lm-head"], "heads/heads.safetensors", "head_loss"),
}


def train_args(recipe, model_dir, data, out):
    # 16 conversations -> 13 train; batches of 4 leave a 1-example batch at the end of the first epoch,
    # so under 2 ranks one rank runs a masked placeholder.
    extra, _, _ = RECIPES[recipe]
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), *extra,
            "--batch-size", "4", "--grad-accum", "2", "--max-steps", "3", "--lr", "3e-3", "--eval-fraction", "0.2",
            "--progress", "false", "--dtype", "fp32", "--device", "cpu"]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return root, save_tiny_model(root / "tiny"), small_data(root / "data.jsonl")


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_fsdp_base_on_two_gloo_ranks_equals_one_process(tmp_path, tiny, recipe, monkeypatch):
    root, model_dir, data = tiny
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    assert main(train_args(recipe, model_dir, data, tmp_path / "single")) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = run_torchrun(["-m", "medusaforge.cli", *train_args(recipe, model_dir, data, tmp_path / "fsdp"), "--fsdp-base"],
                            env, out=tmp_path / "fsdp", timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]

    _, weights_file, step_key = RECIPES[recipe]
    single, sharded = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "fsdp")
    assert [m["step"] for m in sharded] == [1, 2, 3]
    print(f"\n{recipe} --fsdp-base\nstep  loss(1 process)        loss(2 FSDP ranks)     |diff|")
    for one, two in zip(single, sharded):
        print(f"{one['step']:>4}  {one['loss']:.15f}  {two['loss']:.15f}  {abs(one['loss'] - two['loss']):.2e}")
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert two[step_key] == pytest.approx(one[step_key], rel=1e-5)
    assert single[0]["loss"] != single[-1]["loss"]  # the weights moved, so equal curves mean equal updates

    one, two = load_file(str(tmp_path / "single" / weights_file)), load_file(str(tmp_path / "fsdp" / weights_file))
    assert one.keys() == two.keys()
    for name, tensor in one.items():
        # atol 1e-5: Adam divides by sqrt(v), so a weight whose gradient is ~0 moves by a step that
        # float-order noise in that gradient can change in the 6th decimal (seen once: 1.09e-6).
        torch.testing.assert_close(two[name], tensor, rtol=1e-5, atol=1e-5)
    summary = json.loads((tmp_path / "fsdp" / "summary.json").read_text())
    assert summary["world_size"] == 2
