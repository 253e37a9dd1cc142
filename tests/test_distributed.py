"""Data parallelism: 2 processes under torchrun (gloo, CPU) train exactly like 1 process on the
same global batch, and the slicing helpers split a batch the way DistributedSampler would."""

import json
import os

import pytest
import torch
from helpers import run_torchrun, save_tiny_model, small_data
from safetensors.torch import load_file

from medusaforge.cli import main
from medusaforge.training.distributed import placeholder_slice, rank_slice


def test_rank_slices_cover_the_global_batch_once():
    batch = [7, 3, 9, 1, 4]
    slices = [rank_slice(batch, rank, 2) for rank in range(2)]
    assert slices == [[7, 9, 4], [3, 1]]
    assert sorted(sum(slices, [])) == sorted(batch)
    # A one-example batch leaves rank 1 nothing: it runs a placeholder whose loss mask is cleared.
    assert placeholder_slice([5], 1, 2) == ([5], True)
    assert placeholder_slice([5], 0, 2) == ([5], False)


def train_args(model_dir, data, out):
    # 16 conversations -> 13 train; batches of 4 leave a 1-example batch at the end of the first
    # epoch, so under 2 ranks one rank runs a placeholder slice in step 2.
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--num-heads", "2", "--batch-size", "4", "--grad-accum", "2", "--max-steps", "4",
        "--lr", "3e-3", "--eval-fraction", "0.2", "--progress", "false", "--dtype", "fp32",
    ]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    cache = root / "cache"
    os.environ["MEDUSAFORGE_CACHE"] = str(cache)
    try:
        model_dir = save_tiny_model(root / "tiny")
        data = small_data(root / "data.jsonl")
        assert main(train_args(model_dir, data, root / "single")) == 0
    finally:
        del os.environ["MEDUSAFORGE_CACHE"]
    return root, cache, model_dir, data


@pytest.mark.parametrize("extra", [[], ["--fsdp-base"]], ids=["ddp", "ddp+fsdp2-base"])
def test_two_gloo_processes_match_one_process(tmp_path, single_process_run, extra):
    root, cache, model_dir, data = single_process_run
    env = {**os.environ, "MEDUSAFORGE_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    finished = run_torchrun(["-m", "medusaforge.cli", *train_args(model_dir, data, tmp_path / "ddp"), *extra], env, out=tmp_path / "ddp")
    assert finished.returncode == 0, finished.stderr[-3000:]

    single, ddp = read_metrics(root / "single"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in ddp] == [1, 2, 3, 4]
    for one, two in zip(single, ddp):
        # Same global batch, same normalisation; only the order of float sums differs.
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
        assert two["head_loss"] == pytest.approx(one["head_loss"], rel=1e-5)
        assert two["head_top1"] == pytest.approx(one["head_top1"], abs=1e-6)
    print(f"\n{' '.join(extra) or 'ddp'}\nstep  loss(1 process)        loss(2 processes)      |diff|")
    for one, two in zip(single, ddp):
        print(f"{one['step']:>4}  {one['loss']:.15f}  {two['loss']:.15f}  {abs(one['loss'] - two['loss']):.2e}")

    single_heads = load_file(str(root / "single" / "heads" / "heads.safetensors"))
    ddp_heads = load_file(str(tmp_path / "ddp" / "heads" / "heads.safetensors"))
    for name, tensor in single_heads.items():
        torch.testing.assert_close(ddp_heads[name], tensor, rtol=1e-5, atol=1e-6)
    # The held-out evaluation is split over the ranks and all-reduced: same figures.
    single_summary = json.loads((root / "single" / "summary.json").read_text())
    ddp_summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert ddp_summary["world_size"] == 2
    assert ddp_summary["held_out"]["loss"] == pytest.approx(single_summary["held_out"]["loss"], rel=1e-5)
    # Only rank 0 wrote: one metrics line per step, one final checkpoint.
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-000004"]
