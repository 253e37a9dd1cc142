"""Exact resume: a run killed with SIGKILL, then resumed with `--resume auto`, writes the same
metrics.jsonl loss curve as a run that was never interrupted (bitwise, CPU fp32)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import save_tiny_model
from test_distributed import small_data

from medusaforge.training.checkpoint import list_checkpoints, truncate_metrics
from medusaforge.cli import main

# Runs the real CLI in a child process, with one fault hook chosen by the environment:
#   SLOW_STEP=s     sleep s seconds per micro-batch, so a SIGKILL from the parent lands mid-run;
#   KILL_IN_SAVE=n  SIGKILL itself while checkpoint n is half written (files in the temporary
#                   folder, not yet renamed).
CHILD = r"""
import os, signal, sys, time
import medusaforge.training.checkpoint as checkpoint
import medusaforge.commands.train as train
from medusaforge.cli import main

if "SLOW_STEP" in os.environ:
    real_loss = train.medusa_head_losses
    def slow_loss(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_STEP"]))
        return real_loss(*args, **kwargs)
    train.medusa_head_losses = slow_loss
if "KILL_IN_SAVE" in os.environ:
    real_replace = checkpoint.replace_directory
    def replace_or_die(staging, directory):
        if directory.name == "step-%06d" % int(os.environ["KILL_IN_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(staging, directory)
    checkpoint.replace_directory = replace_or_die
sys.exit(main(sys.argv[1:]))
"""

COMPARED = ("step", "loss", "lr", "grad_norm", "head_loss", "head_top1", "head_top5", "skipped")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model_dir = save_tiny_model(root / "tiny")
    data = small_data(root / "data.jsonl")
    return root, model_dir, data


def train_args(model_dir, data, out, max_steps=8):
    return [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--num-heads", "2", "--batch-size", "4", "--max-steps", str(max_steps), "--lr", "3e-3",
        "--eval-fraction", "0.2", "--progress", "false", "--dtype", "fp32",
        "--save-every", "1", "--keep-last", "2",
    ]


def curve(out):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{key: record[key] for key in COMPARED} for record in map(json.loads, lines)]


def start_child(tmp_path, args, cache, **fault):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "MEDUSAFORGE_CACHE": str(cache), **{k: str(v) for k, v in fault.items()}}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_run_then_resume_auto_gives_the_uninterrupted_curve(tmp_path, setup, monkeypatch):
    root, model_dir, data = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    assert main(train_args(model_dir, data, tmp_path / "clean")) == 0

    out = tmp_path / "killed"
    child = start_child(tmp_path, train_args(model_dir, data, out), root / "cache", SLOW_STEP=0.15)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if any(path.name >= "step-000003" for path in list_checkpoints(out / "checkpoints")):
            break
        time.sleep(0.02)
    assert child.poll() is None, "the child finished (or died) before it could be killed:\n" + child.stderr.read()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = len(curve(out))
    assert 3 <= killed_at < 8
    assert not (out / "summary.json").exists()

    assert main([*train_args(model_dir, data, out), "--resume", "auto"]) == 0
    assert curve(out) == curve(tmp_path / "clean")  # bitwise: floats compared with ==
    print(f"\nSIGKILL after {killed_at} logged steps; resumed curve == uninterrupted curve over {len(curve(out))} steps")


def test_sigkill_while_saving_leaves_no_loadable_half_checkpoint(tmp_path, setup, monkeypatch):
    root, model_dir, data = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    assert main(train_args(model_dir, data, tmp_path / "clean", max_steps=6)) == 0

    out = tmp_path / "killed"
    child = start_child(tmp_path, train_args(model_dir, data, out, max_steps=6), root / "cache", KILL_IN_SAVE=4)
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    # The half-written step 4 sits in a temporary folder that `auto` never picks.
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000003"]
    assert any(p.name.startswith(".step-000004.tmp-") for p in checkpoints.iterdir())
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4]  # step 4 was logged before the save died

    assert main([*train_args(model_dir, data, out, max_steps=6), "--resume", "auto"]) == 0
    assert curve(out) == curve(tmp_path / "clean")


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, setup, monkeypatch):
    root, model_dir, data = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    args = train_args(model_dir, data, tmp_path / "clean", max_steps=4)
    assert main(args) == 0
    clean = curve(tmp_path / "clean")
    newest = list_checkpoints(tmp_path / "clean" / "checkpoints")[-1]
    optimizer_file = newest / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])  # truncated on disk
    # An explicit path names the damaged file ...
    assert main([*args, "--resume", str(newest)]) == 1
    # ... while auto falls back to the checkpoint before it and re-runs the last step identically.
    assert main([*args, "--resume", "auto"]) == 0
    assert curve(tmp_path / "clean") == clean


def test_resume_refuses_a_changed_schedule(tmp_path, setup, monkeypatch, capsys):
    root, model_dir, data = setup
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
    args = train_args(model_dir, data, tmp_path / "run", max_steps=3)
    assert main(args) == 0
    changed = [*args, "--resume", "auto", "--batch-size", "2"]
    assert main(changed) == 1
    assert "different data order or LR schedule" in capsys.readouterr().err


def test_truncate_metrics_keeps_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
