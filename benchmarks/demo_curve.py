"""Validation mIoU against training seconds of one training run (issue 39: does the
embedded default's student learn within the demo's budget, and where does it level off).

Reads the run's dvclive `val/mIoU.tsv` (step, value) and its training log (the plain
`training: N/T step (P%) in S s` lines `pipeline train` prints off a terminal), and puts
each validation at the elapsed seconds the log gives for its step (linear between lines).
Seconds are wall time under whatever load the log was written under: `--quiet-step-s`
adds a column at a given seconds-per-step (a quiet machine's), as steps x that.

    python benchmarks/demo_curve.py --dvclive runs/sample/dvclive --log train.log \
        --quiet-step-s 0.237 --out benchmarks/results/demo_recipe/curve.json
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

LINE = re.compile(r"^training: (\d+)/(\d+) step \(\d+%\) in (\d+) s")


def elapsed_at(log: Path) -> list[tuple[int, float]]:
    """(step, seconds) of every plain progress line of a training log, step 0 at 0 s."""
    points = [(0, 0.0)]
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m:
            points.append((int(m.group(1)), float(m.group(3))))
    return sorted(set(points))


def interpolate(points: list[tuple[int, float]], step: int) -> float | None:
    """Seconds at `step`, linear between the nearest logged steps; None past the last."""
    for (s0, t0), (s1, t1) in zip(points, points[1:], strict=False):
        if s0 <= step <= s1:
            return t0 if s1 == s0 else t0 + (t1 - t0) * (step - s0) / (s1 - s0)
    return None


def curve(dvclive: Path, log: Path, quiet_step_s: float | None) -> list[dict]:
    with open(dvclive / "plots" / "metrics" / "val" / "mIoU.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    points = elapsed_at(log)
    out = []
    for r in rows:
        step = int(r["step"])
        row = {"step": step, "val_mIoU": round(float(r["mIoU"]), 2),
               "seconds_logged": interpolate(points, step)}
        if quiet_step_s:
            row["seconds_quiet_estimate"] = round(step * quiet_step_s, 1)
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dvclive", type=Path, required=True)
    ap.add_argument("--log", type=Path, required=True)
    ap.add_argument("--quiet-step-s", type=float, default=None)
    ap.add_argument("--label", default="")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    rows = curve(args.dvclive, args.log, args.quiet_step_s)
    print("| step | val mIoU | s (logged) | s (quiet est.) |\n|---:|---:|---:|---:|")
    for r in rows:
        logged = "" if r["seconds_logged"] is None else f"{r['seconds_logged']:.0f}"
        print(f"| {r['step']} | {r['val_mIoU']:.2f} | {logged} | "
              f"{r.get('seconds_quiet_estimate', '')} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        data = {"label": args.label, "log": str(args.log), "quiet_step_s": args.quiet_step_s,
                "rows": rows}
        args.out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
