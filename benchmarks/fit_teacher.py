"""How long `pipeline fit-teacher` takes with params.yaml's `teacher.fit` on the sample:
the one measured figure the README, docs/stage-one.md, dvc.yaml and `fit-teacher --help`
quote. The fit is deterministic, so its time depends only on the machine and its load;
the load average before and after is recorded beside the wall seconds, and the CPU seconds
(which the load barely changes) beside them.

Usage: python benchmarks/fit_teacher.py [--repeats N] [--work DIR]
Writes benchmarks/results/fit_teacher.json (median and spread over the repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    """CPU seconds (user + system) of the finished child processes: unlike the wall time,
    nearly independent of how many other jobs share the cores."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep the sample here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "fit_teacher.json")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fit-teacher-"))
    sample = work / "deliver-sample"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    subprocess.run(["pipeline", "make-sample", "--out", str(sample)], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    rows = []
    for i in range(args.repeats):
        out = work / f"teacher-{i}"
        load_before = os.getloadavg()[0]
        cpu_before = _children_cpu()
        start = time.perf_counter()
        subprocess.run(["pipeline", "fit-teacher", "--root", str(sample), "--out", str(out),
                        "--overwrite"], check=True, env=env, cwd=ROOT, capture_output=True)
        seconds = time.perf_counter() - start
        rows.append({"repeat": i, "wall_s": round(seconds, 1),
                     "cpu_s": round(_children_cpu() - cpu_before, 1),
                     "load_before": round(load_before, 2),
                     "load_after": round(os.getloadavg()[0], 2)})
        print(f"repeat {i}: {seconds:.1f} s (load {load_before:.1f} -> "
              f"{rows[-1]['load_after']:.1f})")
    walls = [r["wall_s"] for r in rows]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    result = {"benchmark": "fit_teacher", "command": "pipeline fit-teacher (params.yaml "
              "teacher.fit, the 256 px sample)", "commit": commit,
              "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "median_s": statistics.median(walls),
              "median_cpu_s": statistics.median(r["cpu_s"] for r in rows),
              "spread_s": [min(walls), max(walls)], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median {result['median_s']} s over {len(rows)} repeat(s) -> {args.out}")


if __name__ == "__main__":
    main()
