"""Stage one on the generated sample: throughput, model-busy share, bytes, rerun time.

    python benchmarks/teacher_cache.py [--teachers tiny,base] [--limit 200] [--out FILE]

`tiny` is the embedded default teacher (hidden 64, 2 layers); `base` is a random
ViT-B/32-size LanguageBind-format teacher (hidden 768, 12 layers), whose compute per
sample is closer to what hides decoding on a real run. The model-busy share is the
fraction of the compute loop's wall time spent in the captioner and the encoders
(target >= 0.85: decoding hidden behind compute). The rerun time is the wall time of
`pipeline cache-teacher` as a fresh process on a complete store (target < 3 s).
Prints a Markdown table and writes JSON (default benchmarks/results/teacher_cache.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from any2seg.synth import SampleSpec, make_sample
from stages.teacher.default.folders import write_checkpoint, write_default_teacher
from stages.teacher.run import TeacherConfig, cache_teacher

BASE = dict(hidden=768, layers=12, heads=12, projection=512, patch=32)


def make_teacher(kind: str, root: Path) -> Path:
    folder = root / f"teacher-{kind}"
    if kind == "tiny":
        write_default_teacher(folder)
    else:
        for i, branch in enumerate(("image", "depth")):
            write_checkpoint(folder / f"LanguageBind_{branch.capitalize()}", branch,
                             seed=100 + i, text_seed=99, **BASE)
    return folder


def run(kind: str, data: Path, teacher: Path, tmp: Path, limit: int) -> dict:
    out = tmp / f"{kind}.zarr"
    splits = ["train", "val", "test"]
    cfg = TeacherConfig(dataset="sample", root=str(data), out=str(out), split=splits,
                        teacher_root=str(teacher))
    report = cache_teacher(cfg)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    files = sum(1 for p in out.rglob("*") if p.is_file())
    params = tmp / "params.yaml"
    params.write_text("{}\n")
    command = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--dataset", "sample",
               "--root", str(data), "--teacher-root", str(teacher), "--out", str(out),
               "--params", str(params), "--json"]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    rerun = time.perf_counter() - start
    image = sorted((data / "img").rglob("*_rgb_front.png"))[len(splits)]
    pixels = np.array(Image.open(image))
    Image.fromarray(255 - pixels).save(image)  # an in-place edit, same name
    start = time.perf_counter()
    edited = json.loads(subprocess.run(command, check=True, capture_output=True).stdout)
    edit_rerun = time.perf_counter() - start
    return {
        "teacher": kind, "samples": report.computed_rows,
        "samples_per_s": round(report.samples_per_s, 1),
        "model_busy": round(report.model_busy, 3),
        "bytes_per_sample": size // max(report.rows, 1), "store_files": files,
        "rerun_s": round(rerun, 2), "edit_rerun_s": round(edit_rerun, 2),
        "edit_rows": edited["computed_rows"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teachers", default="tiny,base")
    parser.add_argument("--limit", type=int, default=200, help="frames in the sample")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_cache.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        train = int(args.limit * 0.6)
        val = (args.limit - train) // 2
        spec = SampleSpec(size=args.size, train=train, val=val, test=args.limit - train - val)
        make_sample(tmp / "sample", spec)
        for kind in args.teachers.split(","):
            rows.append(run(kind, tmp / "sample", make_teacher(kind, tmp), tmp, args.limit))
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "teacher_cache", "cpu_count": os.cpu_count(),
                                    "machine": platform.machine(), "size": args.size,
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
