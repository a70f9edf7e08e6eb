"""Stage one over a generated set with 1 % of its files damaged, under `--skip-bad`: the
rows skipped and the throughput against the same command on the clean set.

    python benchmarks/soak.py [--frames 2000] [--size 64] [--repeats 5] [--out FILE]

The set is `pipeline make-sample` at a small frame size (kept under --work between runs);
the damaged copy hard-links every intact file and writes the damaged ones anew (the clean
set is never touched). 1 % of the files stage one reads (rgb, raw depth/, event, lidar,
label) are damaged, the kinds of `tests/damage.py` in turn (truncated, damaged compressed
stream, bad CRC, zero bytes, a JPEG under .png, a 16-bit label, a decompression bomb).
Three commands, each in a fresh process with the embedded default teacher, interleaved
over the repeats: clean, clean with --skip-bad (its decode-everything pre-check), damaged
with --skip-bad. Throughput is computed rows over the process's wall time (start-up,
model load and pre-check included) and over the command's own reported time. Prints a
Markdown table and writes JSON (default benchmarks/results/soak.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.damage import (  # noqa: E402
    bad_crc,
    bomb,
    jpeg,
    label_16bit,
    scramble_idat,
    truncated,
    zero_bytes,
)

# stage one's files of a sample: (top folder, file kind); hha/ is training's, not read here
READ = [("img", "rgb"), ("depth", "depth"), ("event", "event"), ("lidar", "lidar"),
        ("semantic", "semantic")]
KINDS = {"truncated": truncated, "damaged IDAT stream": scramble_idat, "bad CRC": bad_crc,
         "zero bytes": zero_bytes, "JPEG under .png": jpeg, "decompression bomb": bomb}


def generate(work: Path, frames: int, size: int) -> Path:
    data = work / f"sample-{frames}-{size}"
    train, val = int(frames * 0.8), frames // 10
    subprocess.run([sys.executable, "-m", "pipeline", "make-sample", "--out", str(data),
                    "--size", str(size), "--train", str(train), "--val", str(val), "--test",
                    str(frames - train - val), "--frames-per-scene", "4"], check=True,
                   env=env(), stdout=subprocess.DEVNULL)
    return data


def damage(clean: Path, damaged: Path, fraction: float,
           seed: int = 0) -> dict[str, tuple[str, str]]:
    """A hard-linked copy of `clean` with `fraction` of stage one's files damaged:
    {path: (kind of damage, sample id)}. Damaged files are unlinked and written anew."""
    from any2seg import datasets

    if damaged.exists():
        shutil.rmtree(damaged)
    shutil.copytree(clean, damaged, copy_function=os.link)
    records = datasets.get("sample").index(damaged, ["train", "val", "test"])
    files = [(r, top, kind) for r in records for top, kind in READ]
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), size=round(fraction * len(files)), replace=False)
    names = list(KINDS)
    done = {}
    for n, i in enumerate(sorted(chosen)):
        record, top, kind = files[i]
        scene, frame = record.id.rsplit("/", 1)
        path = damaged / top / scene / f"{frame}_{kind}_front.png"
        what = "16-bit label" if kind == "semantic" and n % 8 == 7 else names[n % len(names)]
        hurt = label_16bit if what == "16-bit label" else KINDS[what]
        data = hurt(path.read_bytes())
        path.unlink()
        path.write_bytes(data)
        done[str(path)] = (what, record.id)
    return done


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def stage_one(data: Path, teacher: Path, out: Path, skip_bad: bool) -> dict:
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "pipeline", "cache-teacher", "--dataset", "sample",
               "--root", str(data), "--teacher-root", str(teacher), "--out", str(out),
               "--params", str(ROOT / "params.yaml"), "--device", "cpu", "--json"]
    start = time.perf_counter()
    proc = subprocess.run(command + (["--skip-bad"] if skip_bad else []), env=env(),
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage one failed ({proc.returncode}): {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    info = subprocess.run([sys.executable, "-m", "pipeline", "cache-info", str(out), "--json"],
                          env=env(), capture_output=True, text=True, check=True)
    skipped = json.loads(info.stdout)["skipped"]
    shutil.rmtree(out)
    return {"wall_s": wall, "command_s": report["seconds"], "rows": report["computed_rows"],
            "skipped": skipped, "rows_per_s_wall": report["computed_rows"] / wall,
            "rows_per_s_command": report["computed_rows"] / report["seconds"]}


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--runs", default="clean,clean --skip-bad,damaged --skip-bad",
                        help="Comma-separated commands to time (the first is the baseline).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/any2seg-soak"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/soak.json")
    args = parser.parse_args()
    from stages.teacher.default.folders import write_default_teacher

    args.work.mkdir(parents=True, exist_ok=True)
    load_before = load()
    t0 = time.perf_counter()
    clean = generate(args.work, args.frames, args.size)
    generate_s = time.perf_counter() - t0
    damaged_files = damage(clean, args.work / "damaged", args.fraction)
    damaged_samples = len({sample for _, sample in damaged_files.values()})
    kinds = [kind for kind, _ in damaged_files.values()]
    teacher = args.work / "teacher"
    write_default_teacher(teacher)
    runs: dict[str, list[dict]] = {name.strip(): [] for name in args.runs.split(",")}
    loads = []
    for _ in range(args.repeats):  # interleaved, so load drift hits every command alike
        for name in runs:
            data = args.work / "damaged" if name.startswith("damaged") else clean
            loads.append(load())
            runs[name].append(stage_one(data, teacher, args.work / "soak.zarr",
                                        "--skip-bad" in name))
    summary = {}
    for name, rs in runs.items():
        walls = [r["rows_per_s_wall"] for r in rs]
        commands = [r["rows_per_s_command"] for r in rs]
        summary[name] = {"rows": rs[0]["rows"], "skipped": rs[0]["skipped"],
                         "rows_per_s_wall_median": statistics.median(walls),
                         "rows_per_s_wall_spread": [min(walls), max(walls)],
                         "rows_per_s_command_median": statistics.median(commands),
                         "rows_per_s_command_spread": [min(commands), max(commands)],
                         "wall_s_median": statistics.median(r["wall_s"] for r in rs)}
    base = next(iter(summary.values()))["rows_per_s_wall_median"]
    result = {
        "frames": args.frames, "size": args.size, "fraction": args.fraction,
        "files_read_per_sample": [f"{t}/{k}" for t, k in READ],
        "damaged_files": len(damaged_files), "damaged_samples": damaged_samples,
        "damage_kinds": {k: kinds.count(k) for k in sorted(set(kinds))},
        "repeats": args.repeats, "generate_s": round(generate_s, 1), "runs": runs,
        "summary": summary, "machine": platform.platform(), "cpus": os.cpu_count(),
        "load_before": load_before, "load_per_run": loads, "load_after": load(),
        "teacher": "embedded default (stages/teacher/default), device cpu, params.yaml",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"stage one, {args.frames} frames at {args.size} px, {len(damaged_files)} damaged "
          f"files ({100 * args.fraction:g} % of those read) in {damaged_samples} samples; "
          f"median of {args.repeats} interleaved runs; load {load_before} -> {load()}\n")
    print("| run | rows computed | rows skipped | rows/s (process) | spread | "
          "rows/s (command) | vs clean |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: |")
    for name, s in summary.items():
        lo, hi = s["rows_per_s_wall_spread"]
        print(f"| {name} | {s['rows']} | {s['skipped']} | {s['rows_per_s_wall_median']:.1f} | "
              f"{lo:.1f}-{hi:.1f} | {s['rows_per_s_command_median']:.1f} | "
              f"{s['rows_per_s_wall_median'] / base:.2f}x |")


if __name__ == "__main__":
    main()
