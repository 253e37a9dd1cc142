"""benchmarks/convergence.py: held-out points from hand-written metrics lines, the PNG, and the
file:line of a bad line."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"
spec = importlib.util.spec_from_file_location("convergence", SCRIPT)
convergence = importlib.util.module_from_spec(spec)
sys.modules["convergence"] = convergence
spec.loader.exec_module(convergence)

# A Medusa-1 run with --eval-every 2 over 5 steps (two heads), then EAGLE-3's closing line (no seconds).
METRICS = [
    {"step": 1, "loss": 5.0, "head_top1": [0.1, 0.05], "seconds": 3.0},
    {"step": 2, "loss": 4.0, "head_top1": [0.2, 0.1], "seconds": 6.0},
    {"step": 2, "seconds": 6.0, "held_out_top1": [0.25, 0.125], "held_out_loss": [4.1, 5.2]},
    {"step": 3, "loss": 3.5, "head_top1": [0.3, 0.1], "seconds": 9.0},
    {"step": 4, "loss": 3.0, "head_top1": [0.3, 0.2], "seconds": 12.0},
    {"step": 4, "seconds": 12.0, "held_out_top1": [0.375, 0.25], "held_out_loss": [3.0, 4.0]},
    {"step": 5, "loss": 2.5, "head_top1": [0.4, 0.2], "seconds": 15.0},
]
SUMMARY = {"steps": 5, "train_seconds": 15.0, "held_out": {"top1": [0.5, 0.25], "loss": [2.0, 3.0]}}


def write_run(folder: Path, metrics=METRICS, summary=SUMMARY) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_points_are_the_held_out_lines_in_minutes():
    lines = [json.dumps(m) for m in METRICS] + ["", json.dumps({"step": 5, "held_out_top1": [0.5], "held_out_loss": [2.0]})]
    assert convergence.held_out_points(lines, "m.jsonl") == [(2, 0.1, 0.25), (4, 0.2, 0.375)]
    assert convergence.final_point(SUMMARY) == (5, 0.25, 0.5)
    assert convergence.final_point({"steps": 5, "train_seconds": 15.0, "held_out": None}) is None


def test_run_points_end_with_the_summary_and_tolerate_a_run_still_training(tmp_path):
    assert convergence.run_points(write_run(tmp_path / "done")) == [(2, 0.1, 0.25), (4, 0.2, 0.375), (5, 0.25, 0.5)]
    assert convergence.run_points(write_run(tmp_path / "running", summary=None)) == [(2, 0.1, 0.25), (4, 0.2, 0.375)]


@pytest.mark.parametrize("bad", ["{not json", '{"step": 4, "seconds": 1.0, "held_out_top1": []}', '"held_out_top1 seconds"'])
def test_a_bad_line_names_the_file_and_line(tmp_path, bad):
    folder = write_run(tmp_path / "run")
    path = folder / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [bad] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{path}:3: ")):
        convergence.run_points(folder)


def test_main_writes_the_png_and_prints_the_table(tmp_path, capsys):
    medusa, eagle = write_run(tmp_path / "medusa1"), write_run(tmp_path / "second", METRICS[:3], None)
    eval_json = tmp_path / "eval.json"
    eval_json.write_text(json.dumps({"accept_length": 1.75}))
    out = tmp_path / "docs" / "convergence.png"
    # --after: as if the second run had started from the first one's heads (Medusa-2 after stage 1).
    convergence.main(["--run", f"Medusa-1={medusa}", "--run", f"Second={eagle}", "--after", f"Second={medusa}",
                      "--accept", f"Medusa-1=0.25={eval_json}", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["convergence.png"]  # no temporary file left behind
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["Medusa-1", "2", "0.10", "0.250"]
    assert table[3].split() == ["Medusa-1", "5", "0.25", "0.500"]
    assert table[4].split() == ["Second", "2", "0.35", "0.250"]  # 0.10 + stage 1's 0.25 minutes
    assert table[5].split() == ["Medusa-1", "accept", "0.25", "1.750"]
    # --offset: minutes spent generating and caching a run's data, added to its points
    convergence.main(["--run", f"Medusa-1={medusa}", "--offset", "Medusa-1=2.5", "--out", str(out)])
    assert capsys.readouterr().out.splitlines()[1].split() == ["Medusa-1", "2", "2.60", "0.250"]
    with pytest.raises(SystemExit):
        convergence.main(["--run", "no-equals-sign"])
