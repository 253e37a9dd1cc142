"""Exact resume: a run killed with SIGKILL, then resumed with `--resume auto`, writes the same
metrics.jsonl loss curve as a run that was never interrupted (bitwise, CPU fp32), for Medusa-1
and for Medusa-2 (whose checkpoints also hold the base's trainable LoRA weights). Each recipe's
uninterrupted reference run is trained once per module and shared by the tests."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from helpers import save_tiny_model, small_data
from safetensors.torch import load_file

from medusaforge.cli import main
from medusaforge.training.checkpoint import list_checkpoints, truncate_metrics

# Runs the real CLI in a child process, with one fault hook chosen by the environment:
#   PAUSE_AFTER=n   once checkpoint n is in place, the next loss computation (in the recipe module
#                   PAUSE_MODULE) creates the file PAUSE_MARKER and waits there for the parent's
#                   SIGKILL: the kill lands mid-run at the same point however loaded the host is;
#   KILL_IN_SAVE=n  SIGKILL itself while checkpoint n is half written (files in the temporary
#                   folder, not yet renamed).
CHILD = r"""
import importlib, os, signal, sys, time
import medusaforge.files as files
from medusaforge.cli import main

if "PAUSE_AFTER" in os.environ:
    recipe = importlib.import_module(os.environ["PAUSE_MODULE"])
    real_loss, real_replace, saved = recipe.medusa_head_losses, files.replace_directory, []
    def replace_and_note(staging, directory):
        real_replace(staging, directory)
        saved.append(directory.name == "step-%06d" % int(os.environ["PAUSE_AFTER"]))
    def loss_or_pause(*args, **kwargs):
        if any(saved):
            open(os.environ["PAUSE_MARKER"], "w").close()
            time.sleep(3600)
        return real_loss(*args, **kwargs)
    files.replace_directory = replace_and_note
    recipe.medusa_head_losses = loss_or_pause
if "KILL_IN_SAVE" in os.environ:
    real_replace = files.replace_directory
    def replace_or_die(staging, directory):
        if directory.name == "step-%06d" % int(os.environ["KILL_IN_SAVE"]):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(staging, directory)
    files.replace_directory = replace_or_die
sys.exit(main(sys.argv[1:]))
"""

STEPS = 8
COMPARED = {
    "medusa1": ("step", "loss", "lr", "grad_norm", "head_loss", "head_top1", "head_top5", "skipped"),
    "medusa2": ("step", "loss", "base_loss", "heads_loss", "heads_weight", "lr_base", "lr_heads", "grad_norm", "head_top1", "skipped"),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDUSAFORGE_CACHE", str(root / "cache"))
        model_dir = save_tiny_model(root / "tiny")
        data = small_data(root / "data.jsonl")
    return root, model_dir, data


def train_args(setup, out, mode="medusa1"):
    _, model_dir, data = setup
    args = [
        "train", "--model", str(model_dir), "--data", str(data), "--out", str(out),
        "--num-heads", "2", "--batch-size", "4", "--max-steps", str(STEPS), "--lr", "3e-3",
        "--eval-fraction", "0.2", "--progress", "false", "--dtype", "fp32",
        "--save-every", "1", "--keep-last", "2",
    ]
    if mode == "medusa2":
        # LoRA dropout stays on (the default 0.05), so the resumed RNG state matters.
        args += ["--mode", "medusa2", "--lr", "1e-2", "--lora-rank", "4", "--lora-target-modules", "q_proj", "v_proj", "--heads-weight-schedule", "linear"]
    return args


def run_main(setup, argv, monkeypatch):
    monkeypatch.setenv("MEDUSAFORGE_CACHE", str(setup[0] / "cache"))
    return main(argv)


def curve(out, mode="medusa1"):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{key: record[key] for key in COMPARED[mode]} for record in map(json.loads, lines)]


@pytest.fixture(scope="module")
def reference(setup):
    """The uninterrupted runs, one per recipe, trained on first use -> {mode: out folder}."""
    runs = {}

    def get(mode):
        if mode not in runs:
            out = setup[0] / f"reference-{mode}"
            with pytest.MonkeyPatch.context() as patch:
                assert run_main(setup, train_args(setup, out, mode), patch) == 0
            runs[mode] = out
        return runs[mode]

    return get


def copy_of(reference_out, tmp_path):
    """A copy to damage or resume, so the shared reference stays as it was."""
    return shutil.copytree(reference_out, tmp_path / "copy")


def start_child(tmp_path, setup, args, **fault):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "MEDUSAFORGE_CACHE": str(setup[0] / "cache"), **{k: str(v) for k, v in fault.items()}}
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_mid_run(tmp_path, setup, mode, out, after_checkpoint=3):
    """SIGKILL a training child in the step after checkpoint `after_checkpoint`, where it waits for
    the kill (see CHILD). -> the number of steps it had logged."""
    marker = tmp_path / "paused"
    child = start_child(tmp_path, setup, train_args(setup, out, mode), PAUSE_AFTER=after_checkpoint,
                        PAUSE_MODULE=f"medusaforge.training.{mode}", PAUSE_MARKER=marker)
    deadline = time.monotonic() + 600  # a safety net against a hung child only: the child waits for us
    while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists() and child.poll() is None, "the child never reached the pause:\n" + (
        "" if child.poll() is None else child.stderr.read()[-2000:])
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not (out / "summary.json").exists()
    return len(curve(out, mode))


@pytest.mark.parametrize("mode", ["medusa1", "medusa2"])
def test_sigkill_mid_run_then_resume_auto_gives_the_uninterrupted_curve(mode, tmp_path, setup, reference, monkeypatch):
    clean = reference(mode)
    out = tmp_path / "killed"
    killed_at = kill_mid_run(tmp_path, setup, mode, out)
    assert killed_at == 3  # steps 1-3 logged and checkpointed, step 4 cut short

    assert run_main(setup, [*train_args(setup, out, mode), "--resume", "auto"], monkeypatch) == 0
    assert curve(out, mode) == curve(clean, mode)  # bitwise: floats compared with ==
    assert len(curve(out, mode)) == STEPS
    if mode == "medusa2":
        # The trained weights themselves are bit-identical too: adapters and heads.
        for relative in ("adapter/adapter_model.safetensors", "heads/heads.safetensors"):
            resumed, uninterrupted = load_file(str(out / relative)), load_file(str(clean / relative))
            assert resumed.keys() == uninterrupted.keys()
            assert all((resumed[k] == uninterrupted[k]).all() for k in resumed), relative
        assert any("lora_A" in name for name in load_file(str(list_checkpoints(out / "checkpoints")[-1] / "base.safetensors")))
    print(f"\n{mode}: SIGKILL after {killed_at} logged steps; resumed curve == uninterrupted curve over {STEPS} steps")


def test_sigkill_while_saving_leaves_no_loadable_half_checkpoint(tmp_path, setup, reference, monkeypatch):
    out = tmp_path / "killed"
    child = start_child(tmp_path, setup, train_args(setup, out), KILL_IN_SAVE=4)
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    checkpoints = out / "checkpoints"
    # The half-written step 4 sits in a temporary folder that `auto` never picks.
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-000002", "step-000003"]
    assert any(p.name.startswith(".step-000004.tmp-") for p in checkpoints.iterdir())
    assert [r["step"] for r in curve(out)] == [1, 2, 3, 4]  # step 4 was logged before the save died

    assert run_main(setup, [*train_args(setup, out), "--resume", "auto"], monkeypatch) == 0
    assert curve(out) == curve(reference("medusa1"))


def test_resume_auto_skips_a_damaged_newest_checkpoint(tmp_path, setup, reference, monkeypatch):
    out = copy_of(reference("medusa1"), tmp_path)
    newest = list_checkpoints(out / "checkpoints")[-1]
    assert newest.name == f"step-{STEPS:06d}"
    optimizer_file = newest / "optimizer.safetensors"
    optimizer_file.write_bytes(optimizer_file.read_bytes()[:100])  # truncated on disk
    args = train_args(setup, out)
    # An explicit path names the damaged file ...
    assert run_main(setup, [*args, "--resume", str(newest)], monkeypatch) == 1
    # ... while auto falls back to the checkpoint before it and re-runs the last step identically.
    assert run_main(setup, [*args, "--resume", "auto"], monkeypatch) == 0
    assert curve(out) == curve(reference("medusa1"))


def test_resume_refuses_a_changed_schedule(tmp_path, setup, reference, monkeypatch, capsys):
    out = copy_of(reference("medusa1"), tmp_path)
    before = (out / "metrics.jsonl").read_text()
    assert run_main(setup, [*train_args(setup, out), "--resume", "auto", "--batch-size", "2"], monkeypatch) == 1
    assert "different data order or LR schedule" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before  # refused before anything was written


def test_truncate_metrics_keeps_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    assert truncate_metrics(path, 3) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
