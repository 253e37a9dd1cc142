"""The convergence picture: held-out top-1 of head 0 (Medusa) or draft step 0 (EAGLE-3) against
training minutes, for several runs on one axes; optionally accept length against the same minutes.

A run folder is what `medusaforge train --eval-every N` writes: metrics.jsonl, whose held-out lines
(`held_out_top1`, `seconds`) are the points along the way, and summary.json, whose `held_out` and
`train_seconds` are the last point. The seconds are the training loop's own clock on this CPU, with
the held-out evaluations taken out, so runs of different recipes share the x axis. A Medusa-2 run
starts from stage-1 heads; `--after "Medusa-2=STAGE1_DIR"` adds stage 1's training minutes to its
points, so it is drawn where its training began, not at zero.

  .venv/bin/python benchmarks/convergence.py \\
      --run "Medusa-1=runs/conv/medusa1" --run "EAGLE-3=runs/conv/eagle3" --run "Medusa-2=runs/conv/medusa2" \\
      --after "Medusa-2=runs/conv/medusa1" \\
      [--accept "Medusa-1=11.2=runs/conv/medusa1/eval-mt-bench.json" ...] [--out docs/convergence.png]
"""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterable
from pathlib import Path

from medusaforge.files import atomic_write_bytes

Point = tuple[int, float, float]  # (step, training minutes, held-out top-1 of head 0 / step 0)


def held_out_points(lines: Iterable[str], source: str) -> list[Point]:
    """The held-out points of a metrics.jsonl, in file order. Training lines are skipped, and so is
    EAGLE-3's closing held-out line, which has no `seconds`: it repeats summary.json's figure."""
    points = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError(f"a JSON {type(record).__name__}, not an object")
            if "held_out_top1" not in record or "seconds" not in record:
                continue
            points.append((int(record["step"]), float(record["seconds"]) / 60, float(record["held_out_top1"][0])))
        except (ValueError, TypeError, KeyError, IndexError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{source}:{number}: not a metrics line with step, seconds and held_out_top1 ({error!r}): {line.strip()[:80]}") from None
    return points


def final_point(summary: dict) -> Point | None:
    """The run's last point from summary.json, or None when it held nothing out."""
    if not summary.get("held_out"):
        return None
    return int(summary["steps"]), float(summary["train_seconds"]) / 60, float(summary["held_out"]["top1"][0])


def run_points(folder: Path) -> list[Point]:
    metrics = folder / "metrics.jsonl"
    with open(metrics) as handle:
        points = held_out_points(handle, str(metrics))
    summary = folder / "summary.json"
    last = final_point(json.loads(summary.read_text())) if summary.is_file() else None  # no summary: still training
    return points + ([last] if last is not None else [])


def labelled(value: str, parts: int) -> list[str]:
    """'LABEL=DIR' or 'LABEL=MINUTES=EVAL_JSON' -> its parts (the last may contain '=')."""
    fields = value.split("=", parts - 1)
    if len(fields) != parts or not all(fields):
        raise argparse.ArgumentTypeError(f"expected {parts} non-empty fields separated by '=', got {value!r}")
    return fields


def plot(curves: dict[str, list[Point]], accepts: dict[str, list[tuple[float, float]]], path: Path, total_cpu: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a training host
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2 if accepts else 1, figsize=(11 if accepts else 6, 4), squeeze=False)
    top1_axis = axes[0][0]
    for label, points in curves.items():
        top1_axis.plot([m for _, m, _ in points], [t for _, _, t in points], marker="o", label=label)
    top1_axis.set_xlabel("CPU minutes: generation and caching, then training" if total_cpu
                         else "training minutes on this CPU (held-out evaluation excluded)")
    top1_axis.set_ylabel("held-out top-1, head 0 / draft step 0")
    top1_axis.grid(alpha=0.3)
    top1_axis.legend()
    if accepts:
        accept_axis = axes[0][1]
        for label, points in accepts.items():
            accept_axis.plot([m for m, _ in points], [a for _, a in points], marker="s", label=label)
        accept_axis.set_xlabel("CPU minutes: generation and caching, then training" if total_cpu else "training minutes on this CPU")
        accept_axis.set_ylabel("accept length (tokens per verify step)")
        accept_axis.grid(alpha=0.3)
        accept_axis.legend()
    figure.tight_layout()
    # Rendered in memory, then a temporary file and a rename: a reader never sees half a PNG.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, type=lambda v: labelled(v, 2), help="LABEL=RUN_DIR (repeatable)")
    parser.add_argument("--after", action="append", default=[], type=lambda v: labelled(v, 2),
                        help="LABEL=STAGE1_DIR: LABEL's run started from that run's heads; its training minutes are added to LABEL's points")
    parser.add_argument("--offset", action="append", default=[], type=lambda v: labelled(v, 2),
                        help="LABEL=MINUTES: CPU minutes spent before LABEL's training (generating and caching its data), added to its "
                             "points, so recipes are compared at total CPU time")
    parser.add_argument("--accept", action="append", default=[], type=lambda v: labelled(v, 3),
                        help="LABEL=MINUTES=EVAL_JSON: accept length of `medusaforge eval --json` after MINUTES of training (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("docs/convergence.png"))
    args = parser.parse_args(argv)

    curves = {label: run_points(Path(folder)) for label, folder in args.run}
    for label, stage1 in args.after:
        if label not in curves:
            parser.error(f"--after {label}=...: no --run is labelled {label!r}")
        offset = float(json.loads((Path(stage1) / "summary.json").read_text())["train_seconds"]) / 60
        curves[label] = [(step, minutes + offset, top1) for step, minutes, top1 in curves[label]]
    for label, minutes in args.offset:
        if label not in curves:
            parser.error(f"--offset {label}=...: no --run is labelled {label!r}")
        curves[label] = [(step, m + float(minutes), top1) for step, m, top1 in curves[label]]
    accepts: dict[str, list[tuple[float, float]]] = {}
    for label, minutes, eval_json in args.accept:
        accepts.setdefault(label, []).append((float(minutes), float(json.loads(Path(eval_json).read_text())["accept_length"])))
    accepts = {label: sorted(points) for label, points in accepts.items()}
    plot(curves, accepts, args.out, total_cpu=bool(args.offset))

    print(f"{'run':<16} {'step':>6} {'minutes':>8} {'top-1':>6}")
    for label, points in curves.items():
        for step, minutes, top1 in points:
            print(f"{label:<16} {step:>6} {minutes:>8.2f} {top1:>6.3f}")
    for label, points in accepts.items():
        for minutes, accept_length in points:
            print(f"{label:<16} {'accept':>6} {minutes:>8.2f} {accept_length:>6.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
