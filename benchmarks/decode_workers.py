"""Do stage one's decode workers scale as threads? (`teacher.decode_workers`)

    python benchmarks/decode_workers.py [--frames 8] [--repeats 5] [--workers 1,2]
                                        [--root DELIVER-LAYOUT-FOLDER]

The work is what `cache-teacher`'s decode pool does per sample on a first build
(`ShardWorker.prepare` with `hash_files`): read every file once, hash it, decode it (libpng
or PIL), and preprocess every modality for its LanguageBind branch at 224 px (the
bicubic antialiased resize of the full frame). It runs over the same samples in a thread
pool of each size in `--workers` and, for comparison, a process pool of the largest size
(fork; its start-up is not timed), interleaved within every repeat; torch runs one
intra-op thread per worker. Reported: seconds per sample (median, min-max) and the
speed-up over the smallest pool.

Wall-clock speed-up needs free cores: on a shared machine the kernel's autogroup gives
this session a fixed share of the CPUs whatever its thread count, and no pool scales.
So each worker also accounts for its own time from /proc/thread-self/schedstat (Linux):
on a CPU, runnable but waiting for one (the load), and the rest, blocked: for this
in-memory work (the files are in the page cache after the warm-up), waiting for the GIL.
A pool whose workers are rarely blocked scales with free cores; a control, a pure Python
loop through the same thread pools, shows what holding the GIL looks like. Writes
benchmarks/results/decode_workers.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from any2seg import datasets
from any2seg.datasets.decode import recording_digests
from any2seg.synth import SampleSpec, make_sample

MODALITIES = ["rgb", "depth", "event", "lidar"]
TEACHER_BRANCH = {"rgb": "image", "depth": "depth", "event": "image", "lidar": "image"}
_SAMPLES: datasets.SampleSequence | None = None  # set before the process pool forks
SCHEDSTAT = Path("/proc/thread-self/schedstat")


def _sched() -> tuple[float, float]:
    """This thread's seconds on a CPU and runnable waiting for one (0, 0 off Linux)."""
    try:
        on_cpu, waiting, _ = SCHEDSTAT.read_text().split()
    except OSError:
        return 0.0, 0.0
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _accounted(work: Any, arg: Any) -> tuple[float, float, float]:
    """Run `work(arg)`; (wall, on-CPU, runnable-waiting) seconds of this worker thread."""
    cpu0, wait0 = _sched()
    start = time.perf_counter()
    work(arg)
    wall = time.perf_counter() - start
    cpu1, wait1 = _sched()
    return wall, cpu1 - cpu0, wait1 - wait0


def prepare(index: int) -> None:
    """`ShardWorker.prepare(index, hash_files=True)` without a model: decode + hash every
    file of the sample in one read, preprocess every modality for its branch."""
    from stages.teacher.languagebind import preprocess_depth, preprocess_image
    from stages.teacher.run import model_input

    assert _SAMPLES is not None
    with recording_digests() as digests:
        sample = _SAMPLES[index]
    assert len(digests) == len(MODALITIES) + 1  # and the label
    for m, b in TEACHER_BRANCH.items():
        x = model_input(sample, m, b)
        out = preprocess_depth(x, 10.0, 224) if b == "depth" else preprocess_image(x, 224)
        assert out.shape == (3, 224, 224)


def python_loop(_: int) -> None:
    """The control: pure Python, holding the GIL throughout."""
    x = 0
    for _ in range(2_000_000):
        x += 1


def prepare_accounted(index: int) -> tuple[float, float, float]:
    return _accounted(prepare, index)


def loop_accounted(index: int) -> tuple[float, float, float]:
    return _accounted(python_loop, index)


def _one_thread() -> None:
    torch.set_num_threads(1)


def main() -> None:
    global _SAMPLES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a DELIVER-layout folder (default: generate)")
    parser.add_argument("--size", type=int, default=1042)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", default="1,2", help="thread-pool sizes to compare")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/decode_workers.json"))
    args = parser.parse_args()
    sizes = sorted({int(w) for w in args.workers.split(",")})
    torch.set_num_threads(1)
    result: dict[str, Any] = {"benchmark": "decode_workers", "size": args.size,
                              "repeats": args.repeats, "cpu_count": os.cpu_count(),
                              "machine": platform.machine(), "torch_threads": 1,
                              "schedstat": SCHEDSTAT.exists(),
                              "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "sample"
            make_sample(root, SampleSpec(size=args.size, train=args.frames, val=0, test=0))
        _SAMPLES = datasets.load("sample", root, "train", modalities=MODALITIES,
                                 depth_source="raw")[:args.frames]
        n = len(_SAMPLES)
        result["frames"] = n
        pools: dict[str, Executor] = {f"threads:{w}": ThreadPoolExecutor(w) for w in sizes}
        biggest = sizes[-1]
        pools[f"processes:{biggest}"] = ProcessPoolExecutor(
            biggest, mp_context=multiprocessing.get_context("fork"), initializer=_one_thread)
        runs = [(name, "prepare", pool, prepare_accounted) for name, pool in pools.items()]
        runs += [(name, "python loop (control)", pool, loop_accounted)
                 for name, pool in pools.items() if name.startswith("threads")]
        times: dict[tuple[str, str], list[float]] = {(p, w): [] for p, w, _, _ in runs}
        spent = {key: [0.0, 0.0, 0.0] for key in times}
        try:
            for _, _, pool, fn in runs:  # warm-up: imports, process start, page cache
                list(pool.map(fn, range(min(n, biggest))))
            for _ in range(args.repeats):
                for name, work, pool, fn in runs:
                    start = time.perf_counter()
                    for acc in pool.map(fn, range(n)):
                        spent[(name, work)] = [a + b for a, b in zip(spent[(name, work)], acc,
                                                                     strict=True)]
                    times[(name, work)].append((time.perf_counter() - start) / n)
        finally:
            for pool in pools.values():
                pool.shutdown()
    result["load_after"] = os.getloadavg()[0]
    rows: dict[str, dict[str, Any]] = {}
    for (name, work), t in times.items():
        base = statistics.median(times[(f"threads:{sizes[0]}", work)])
        wall, cpu, waiting = spent[(name, work)]
        med = statistics.median(t)
        rows[f"{work} / {name}"] = {
            "median": med, "min": min(t), "max": max(t), "speedup": round(base / med, 3),
            "on_cpu": round(cpu / wall, 3), "waiting_for_a_cpu": round(waiting / wall, 3),
            "blocked": round((wall - cpu - waiting) / wall, 3)}
    result["rows"] = rows
    print(f"{n} frames of {args.size} px, {args.repeats} interleaved repeats, "
          f"{result['cpu_count']} cores, load {result['load_before']:.1f} -> "
          f"{result['load_after']:.1f}; ms per sample, median (min-max); the workers' "
          "time: on a CPU / runnable, waiting for one / blocked (the GIL)")
    print(f"| work / pool | ms per sample | speed-up vs threads:{sizes[0]} | on CPU | "
          "waiting for a CPU | blocked |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, r in rows.items():
        print(f"| {key} | {r['median'] * 1e3:.1f} ({r['min'] * 1e3:.1f}-{r['max'] * 1e3:.1f})"
              f" | {r['speedup']:.2f} | {r['on_cpu']:.2f} | {r['waiting_for_a_cpu']:.2f} | "
              f"{r['blocked']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
