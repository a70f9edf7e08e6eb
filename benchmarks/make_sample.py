"""Speed of the embedded default data: generating the sample and reading it back.

Prints a table and writes JSON (default benchmarks/results/make_sample.json). Targets
from the foundation issue: the default sample (256 px, 200 frames) in under 60 s on
2 cores; reading must keep up with a CPU student (hundreds of samples/s at 256 px).

    python benchmarks/make_sample.py [--sizes 256,512] [--workers 1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from any2seg import datasets
from any2seg.synth import SampleSpec, make_sample


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bench(size: int, workers: int, tmp: Path) -> dict:
    spec = SampleSpec(size=size)
    out = tmp / f"s{size}-{workers}"
    start = time.perf_counter()
    make_sample(out, spec, workers=workers)
    gen_s = time.perf_counter() - start
    start = time.perf_counter()
    make_sample(out, spec, workers=workers)
    rerun_s = time.perf_counter() - start
    ds = datasets.load("sample", out, "train,val,test")
    start = time.perf_counter()
    for sample in ds:
        assert sample.label.shape == (size, size)
    read_s = time.perf_counter() - start
    n = len(ds)
    row = {
        "size": size, "workers": workers, "frames": n,
        "generate_s": round(gen_s, 2), "generate_frames_per_s": round(n / gen_s, 1),
        "rerun_s": round(rerun_s, 3),
        "read_frames_per_s": round(n / read_s, 1),
        "bytes_per_frame": disk_bytes(out) // n,
    }
    shutil.rmtree(out)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256")
    parser.add_argument("--workers", default=f"1,{os.cpu_count() or 1}")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/make_sample.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for workers in sorted({int(w) for w in args.workers.split(",")}):
                rows.append(bench(size, workers, Path(tmp)))
    cols = list(rows[0])
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "make_sample", "cpu_count": os.cpu_count(),
              "machine": platform.machine(), "python": platform.python_version(),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
