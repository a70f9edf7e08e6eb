"""Per-frame inference time: eager PyTorch against ONNX Runtime on the CPU.

    python benchmarks/inference.py [--sizes 512,1024] [--backbones mit_b0,mit_b2]
                                   [--repeats 3] [--repeats-large 1] [--threads 1,2]

For each backbone (random weights: time does not depend on the values; mit_b0 with the
head at 256, mit_b2 at 768 as the DELIVER preset, MFF `author`, missing `exclude`), each
subset (all four modalities, RGB alone) and each square frame size, one frame is run by:
- `eager graph`: the exported module (`stages.student.export.SubsetGraph`) in PyTorch,
  the same computation as the ONNX graph (only the subset's modalities encoded);
- `eager predict`: what `pipeline predict` runs (evaluate's `infer`), which encodes
  every modality slot of the checkpoint, given or not, so that its classes are exactly
  evaluate's: RGB alone costs what four modalities cost;
- `onnxruntime`: the exported graph on ONNX Runtime's CPU provider;
each at 1 and 2 threads (torch.set_num_threads / intra_op_num_threads). Repeats are
interleaved (engine by engine within a repeat) after one warm-up each; the table gives
the median and the spread (min..max) in seconds per frame. `--repeats-large` is the count
for 1024 px with mit_b2 (tens of seconds per run on a small CPU; no warm-up there, so
its one run includes first-run costs), `--large-subsets` limits the subsets there and
`--predict-sizes` the sizes `eager predict` runs at (it costs what `all four` costs).
Writes JSON (default benchmarks/results/inference.json) with the machine's load before
and after.

`--peak-memory` adds each engine's peak resident memory at 1 thread: after the timing of
a backbone / subset / size, every engine runs the frame once more in a fresh process
(`--peak-child`, the same seed, so the same weights; ONNX Runtime on the graph the parent
exported) that reports its resident high-water mark (`VmHWM`) after building the model
(and session) and after the frame: the rows get `rss_setup_mb` and `rss_peak_mb`. A fresh
process, because a process's high-water mark never comes down and the engines of one
process would hide each other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from stages.student.evaluate import infer
from stages.student.export import SubsetGraph, export_onnx, onnx_session, random_frames
from stages.student.model import StudentConfig, build_student

MODALITIES = ["rgb", "depth", "event", "lidar"]
SUBSETS = {"all four": MODALITIES, "rgb": ["rgb"]}
HEAD = {"mit_b0": 256, "mit_b2": 768}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _runners(model: torch.nn.Module, subset: list[str], session_for: Any, size: int
             ) -> dict[str, Any]:
    """name -> (threads -> a function running one frame)."""
    x = torch.stack(random_frames(model, subset, [(size, size)], 1))
    graph = SubsetGraph(model, subset).eval()
    full = model.filler(x).expand(1, -1, 3, size, size).clone()
    idx = [MODALITIES.index(m) for m in subset]
    full[:, idx] = x
    mask = torch.zeros(1, len(MODALITIES), dtype=torch.bool)
    mask[0, idx] = True
    feed = {"images": x.numpy()}

    def eager_graph(threads: int) -> None:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            graph(x)

    def eager_predict(threads: int) -> None:
        torch.set_num_threads(threads)
        infer(model, full, mask, filler_cache={})

    def ort(threads: int) -> None:
        session_for(threads).run(None, feed)

    return {"eager graph": eager_graph, "eager predict": eager_predict, "onnxruntime": ort}


def _student(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    student = StudentConfig(backbone=backbone, embed_dim=HEAD.get(backbone, 256),
                            mff={"variant": "author"}, missing="exclude")
    return build_student(student, MODALITIES, 25).eval()


def _rss_mb() -> float:
    """This process's resident high-water mark in MB. Linux: `VmHWM`, which starts afresh
    at exec; `ru_maxrss` would carry the parent's resident size at the fork over the exec
    (a child of a 3 GB benchmark reports at least 3 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_child(engine: str, backbone: str, subset: str, size: int, onnx: str | None) -> None:
    """One frame of one engine at 1 thread in this (fresh) process; prints the resident
    high-water mark after setup and after the frame as JSON."""
    torch.set_num_threads(1)
    model = _student(backbone)
    sessions: dict[int, Any] = {}

    def session_for(n: int) -> Any:
        if n not in sessions:
            sessions[n] = onnx_session(Path(onnx), threads=n)
        return sessions[n]

    run = _runners(model, SUBSETS[subset], session_for, size)[engine]
    if engine == "onnxruntime":
        session_for(1)
    setup = _rss_mb()
    run(1)
    print(json.dumps({"rss_setup_mb": round(setup), "rss_peak_mb": round(_rss_mb())}))


def _peaks(backbone: str, subset: str, size: int, engines: list[str], onnx: Path
           ) -> dict[str, dict[str, int]]:
    out = {}
    for engine in engines:
        got = subprocess.run(
            [sys.executable, __file__, "--peak-child", engine, "--backbones", backbone,
             "--peak-subset", subset, "--sizes", str(size), "--peak-onnx", str(onnx)],
            capture_output=True, text=True, check=False)
        lines = got.stdout.strip().splitlines()
        if got.returncode != 0 or not lines:
            raise SystemExit(f"peak-memory child for {engine} {backbone} {subset} {size}px "
                             f"failed ({got.returncode}): {got.stderr.strip()[-500:]}")
        out[engine] = json.loads(lines[-1])
        print(f"[inference] {backbone} {subset} {size}px {engine}: peak "
              f"{out[engine]['rss_peak_mb']} MB resident ({out[engine]['rss_setup_mb']} "
              "after setup)", flush=True)
    return out


def measure(backbone: str, sizes: list[int], threads: list[int], repeats: int,
            repeats_large: int, scratch: Path, predict_sizes: list[int],
            large_subsets: list[str] | None, eager_threads: list[int] | None = None,
            peak_memory: bool = False, engines: list[str] | None = None
            ) -> list[dict[str, Any]]:
    model = _student(backbone)
    rows = []
    for name, subset in SUBSETS.items():
        t0 = time.perf_counter()
        path = export_onnx(model, subset, scratch / f"{backbone}.{'+'.join(subset)}.onnx")
        export_s = time.perf_counter() - t0
        sessions: dict[int, Any] = {}

        def session_for(n: int, path: Path = path, sessions: dict[int, Any] = sessions) -> Any:
            if n not in sessions:
                sessions[n] = onnx_session(path, threads=n)
            return sessions[n]

        for size in sizes:
            large = size >= 1024 and backbone != "mit_b0"
            if large and large_subsets is not None and name not in large_subsets:
                continue
            runs = _runners(model, subset, session_for, size)
            if size not in predict_sizes:
                del runs["eager predict"]
            if engines is not None:
                runs = {e: f for e, f in runs.items() if e in engines}
            count = repeats_large if large else repeats
            times: dict[tuple[str, int], list[float]] = {
                (e, n): [] for e in runs for n in threads
                if e == "onnxruntime" or eager_threads is None or n in eager_threads}
            if not large:  # warm-up: allocation, ORT's first-run planning
                for (engine, n) in times:
                    runs[engine](n)
            for _ in range(count):  # interleaved: every engine once per repeat
                for (engine, n), got in times.items():
                    t = time.perf_counter()
                    runs[engine](n)
                    got.append(time.perf_counter() - t)
            peaks = _peaks(backbone, name, size, list(runs), path) if peak_memory else {}
            for (engine, n), got in times.items():
                rows.append({"backbone": backbone, "subset": name, "size": size,
                             "engine": engine, "threads": n, "repeats": count,
                             "median_s": round(statistics.median(got), 4),
                             "min_s": round(min(got), 4), "max_s": round(max(got), 4),
                             "export_s": round(export_s, 1),
                             **(peaks.get(engine, {}) if n == 1 else {})})
            print(f"[inference] {backbone} {name} {size}px: " + ", ".join(
                f"{e} x{n} {statistics.median(v):.3f}s" for (e, n), v in times.items()),
                flush=True)
    return rows


def table(rows: list[dict[str, Any]], threads: list[int]) -> str:
    engines = ["eager graph", "onnxruntime", "eager predict"]
    head = "| backbone | subset | px | " + " | ".join(
        f"{e} x{n}" for e in engines for n in threads) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * (len(engines) * len(threads))]
    keys = dict.fromkeys((r["backbone"], r["subset"], r["size"]) for r in rows)
    for b, s, px in keys:
        cells = []
        for e in engines:
            for n in threads:
                r = next((r for r in rows if (r["backbone"], r["subset"], r["size"],
                                              r["engine"], r["threads"]) == (b, s, px, e, n)),
                         None)
                if r is None:
                    cells.append("-")
                    continue
                spread = f" ({r['min_s']:.2f}..{r['max_s']:.2f})" if r["repeats"] > 1 else ""
                cells.append(f"{r['median_s']:.2f}{spread}")
        lines.append(f"| {b} | {s} | {px} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Peak resident MB at 1 thread (after setup in brackets), where measured."""
    engines = ["eager graph", "onnxruntime", "eager predict"]
    lines = ["| backbone | subset | px | " + " | ".join(engines) + " |",
             "|---|---|---:|" + "---:|" * len(engines)]
    keys = dict.fromkeys((r["backbone"], r["subset"], r["size"]) for r in rows
                         if "rss_peak_mb" in r)
    for b, s, px in keys:
        cells = []
        for e in engines:
            r = next((r for r in rows if (r["backbone"], r["subset"], r["size"], r["engine"])
                      == (b, s, px, e) and "rss_peak_mb" in r), None)
            cells.append("-" if r is None else f"{r['rss_peak_mb']} ({r['rss_setup_mb']})")
        lines.append(f"| {b} | {s} | {px} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--backbones", default="mit_b0,mit_b2")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeats-large", type=int, default=1,
                        help="repeats at 1024 px and above for backbones other than mit_b0")
    parser.add_argument("--predict-sizes", default="512",
                        help="sizes at which `eager predict` runs too")
    parser.add_argument("--large-subsets", default=None,
                        help="at 1024 px and above for backbones other than mit_b0, only "
                        "these subsets (comma-separated; default: all)")
    parser.add_argument("--eager-threads", default=None,
                        help="thread counts for the eager engines (default: --threads); "
                        "on a loaded CPU OpenMP's spinning makes 2 eager threads crawl")
    parser.add_argument("--peak-memory", action="store_true",
                        help="also each engine's peak resident memory at 1 thread, one "
                        "frame in a fresh process per engine (costs one more run each)")
    parser.add_argument("--engines", default=None,
                        help="only these engines (comma-separated: eager graph, onnxruntime, "
                        "eager predict; default: all)")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-subset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--peak-onnx", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/inference.json"))
    args = parser.parse_args()
    if args.peak_child:
        peak_child(args.peak_child, args.backbones, args.peak_subset, int(args.sizes),
                   args.peak_onnx)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    import onnxruntime

    load_before = _load()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="inference-bench-") as scratch:
        for backbone in args.backbones.split(","):
            rows += measure(backbone, sizes, threads, args.repeats, args.repeats_large,
                            Path(scratch), [int(s) for s in args.predict_sizes.split(",")],
                            args.large_subsets.split(",") if args.large_subsets else None,
                            [int(t) for t in args.eager_threads.split(",")]
                            if args.eager_threads else None, args.peak_memory,
                            args.engines.split(",") if args.engines else None)
    report = {
        "benchmark": "inference", "weights": "random (time does not depend on the values)",
        "settings": {"sizes": sizes, "threads": threads, "repeats": args.repeats,
                     "repeats_large": args.repeats_large, "subsets": SUBSETS,
                     "predict_sizes": args.predict_sizes, "large_subsets": args.large_subsets,
                     "eager_threads": args.eager_threads,
                     "peak_memory": args.peak_memory, "engines": args.engines,
                     "head": HEAD, "mff": "author", "missing": "exclude",
                     "frame": "one frame per run (batch 1), whole-frame inference"},
        "environment": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                        "python": platform.python_version(), "machine": platform.platform(),
                        "cpu_count": os.cpu_count(), "load_before": load_before,
                        "load_after": _load(),
                        "seconds": round(time.perf_counter() - t0, 1)},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(rows, threads))
    if args.peak_memory:
        print(memory_table(rows))
    print(f"load average before {load_before}, after {report['environment']['load_after']}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
