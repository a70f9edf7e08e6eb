"""What converting to float after cropping would save on the training data path, and why
it is not done.

    python benchmarks/crop_first.py [--frames 8] [--repeats 5] [--crop 1024] [--root DIR]

`StudentData` converts every full frame to float (`to_unit`), resizes the whole float
frame by a random factor (bilinear, short side crop * U(0.5, 2.0), up to 2048 px), then
crops `crop` x `crop`. Cropping first would convert and resize only the source window
the crop reads. With the same random draws as `StudentData` (seed, epoch, index), per
sample of 4 modalities at 1042 px:
- project: `to_unit` of the full frames + the full-frame resize + the crop (today);
- crop first: `to_unit` of the source windows + resizing each window to the crop.
Resizing a window with `F.interpolate` is not bit-equal to cropping the resized frame:
torch's bilinear kernel computes every source coordinate from the output index and the
whole-frame scale, so a window's coordinates differ (by a fraction of a source pixel
unless the window starts where the whole frame's sampling grid does); the "crop first"
column is only the time an exact kernel as fast as torch's would take, an upper bound
on the saving.

An exact window does exist: `exact_window` reproduces torch's one-thread kernel (the
channels-last one it picks for 3 channels; with more threads it picks another) from the
whole-frame coordinates, with the FMA contraction of the compiled AVX2/AVX-512 kernel
emulated in float64. It is timed on the first repeat and checked with torch.equal
against today's output: written in tensor operations it is slower than the C++ resize
of the whole frame it would replace, and it is tied to torch's kernel choice (threads,
CPU capability), so it is not used. Writes benchmarks/results/crop_first.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from any2seg import datasets
from any2seg.synth import SampleSpec, make_sample
from stages.student.data import AugmentConfig, to_unit

MODALITIES = ["rgb", "depth", "event", "lidar"]


def draws(h: int, w: int, crop: int, cfg: AugmentConfig, seed: int, epoch: int,
          index: int) -> tuple[int, int, int, int]:
    """(nh, nw, top, left) as `augment` draws them for this key."""
    rng = np.random.default_rng([seed, epoch, index])
    s = rng.uniform(*cfg.scale) * crop / min(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    top = int(rng.integers(0, max(nh, crop) - crop + 1))
    left = int(rng.integers(0, max(nw, crop) - crop + 1))
    return nh, nw, top, left


def source_span(start: int, size: int, n_in: int, n_out: int) -> tuple[int, int]:
    """Source rows [lo, hi) that output rows [start, start + size) of a bilinear resize
    n_in -> n_out read (align_corners=False)."""
    scale = n_in / n_out
    lo = max(0, int(np.floor(scale * (start + 0.5) - 0.5)))
    hi = min(n_in, int(np.floor(scale * (start + size - 0.5) - 0.5)) + 2)
    return lo, hi


def _fma(p: torch.Tensor, q: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, emulated in float64 (the product is exact there)."""
    return (p.double() * q.double() + acc.double()).float()


def _taps(n_in: int, n_out: int, start: int, n: int) -> tuple[torch.Tensor, ...]:
    """Source indices and weights of output rows [start, start + n), as torch's kernel
    computes them for the whole n_in -> n_out resize (align_corners=False)."""
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    d = torch.arange(start, start + n, dtype=torch.float32)
    src = _fma(scale.expand_as(d), d + 0.5, torch.full_like(d, -0.5)).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    l1 = (src - i0.float()).clamp(0, 1)
    return i0, torch.where(i0 < n_in - 1, i0 + 1, i0), 1 - l1, l1


def exact_window(arr: np.ndarray, nh: int, nw: int, top: int, left: int, ch: int,
                 cw: int) -> torch.Tensor:
    """`to_unit(arr)` resized to (nh, nw) and cropped, from the source window only."""
    r0, r1, h0, h1 = _taps(arr.shape[0], nh, top, ch)
    c0, c1, w0, w1 = _taps(arr.shape[1], nw, left, cw)
    lo_r, lo_c = int(r0.min()), int(c0.min())
    x = to_unit(arr[lo_r:int(r1.max()) + 1, lo_c:int(c1.max()) + 1])
    r0, r1, c0, c1 = r0 - lo_r, r1 - lo_r, c0 - lo_c, c1 - lo_c
    top_rows, bottom_rows = x[:, r0], x[:, r1]
    w00, w01 = h0[:, None] * w0, h0[:, None] * w1
    w10, w11 = h1[:, None] * w0, h1[:, None] * w1
    out = _fma(top_rows[:, :, c0], w00, top_rows[:, :, c1] * w01)
    out = _fma(bottom_rows[:, :, c0], w10, out)
    return _fma(bottom_rows[:, :, c1], w11, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a DELIVER-layout folder (default: generate)")
    parser.add_argument("--size", type=int, default=1042)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/crop_first.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one data worker per core
    cfg, seed, crop = AugmentConfig(), 3407, args.crop
    result: dict[str, Any] = {"benchmark": "crop_first", "size": args.size, "crop": crop,
                              "repeats": args.repeats, "cpu_count": os.cpu_count(),
                              "machine": platform.machine(), "torch_threads": 1,
                              "load_before": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "sample"
            make_sample(root, SampleSpec(size=args.size, train=args.frames, val=0, test=0))
        samples = datasets.load("sample", root, "train", modalities=MODALITIES)
        frames = [[samples[i].modalities[m] for m in MODALITIES]
                  for i in range(min(args.frames, len(samples)))]
    times: dict[str, list[float]] = {"project": [], "crop_first": [], "to_unit_full": [],
                                     "to_unit_window": []}
    exact_s, exact_equal, exact_n = 0.0, 0, 0
    for epoch in range(args.repeats):
        t = dict.fromkeys(times, 0.0)
        for i, arrays in enumerate(frames):
            h, w = arrays[0].shape[:2]
            nh, nw, top, left = draws(h, w, crop, cfg, seed, epoch, i)
            ch, cw = min(crop, nh), min(crop, nw)
            r0, r1 = source_span(top, ch, h, nh)
            c0, c1 = source_span(left, cw, w, nw)
            for arr in arrays:
                start = time.perf_counter()
                x = to_unit(arr)
                mid = time.perf_counter()
                full = F.interpolate(x[None], size=(nh, nw), mode="bilinear",
                                     align_corners=False)[0, :, top:top + ch, left:left + cw]
                end = time.perf_counter()
                y = to_unit(arr[r0:r1, c0:c1])
                mid2 = time.perf_counter()
                part = F.interpolate(y[None], size=(ch, cw), mode="bilinear",
                                     align_corners=False)[0]
                end2 = time.perf_counter()
                t["project"] += end - start
                t["to_unit_full"] += mid - start
                t["crop_first"] += end2 - end
                t["to_unit_window"] += mid2 - end
                assert part.shape == full.shape
                if epoch == 0:  # the exact emulation, once per frame and modality
                    start = time.perf_counter()
                    exact = exact_window(arr, nh, nw, top, left, ch, cw)
                    exact_s += time.perf_counter() - start
                    exact_equal += int(torch.equal(exact, full))
                    exact_n += 1
        for k, v in t.items():
            times[k].append(v / len(frames))
    result["load_after"] = os.getloadavg()[0]
    rows = {k: {"median": statistics.median(v), "min": min(v), "max": max(v)}
            for k, v in times.items()}
    saving = rows["project"]["median"] - rows["crop_first"]["median"]
    rows["exact_window"] = {"median": exact_s / len(frames)}
    result.update(rows=rows, saving_per_sample=saving,
                  exact_window_equal=f"{exact_equal}/{exact_n}")
    print(f"{len(frames)} frames of {args.size} px, crop {crop}, {args.repeats} repeats (other "
          f"draws each), 1 torch thread, load {result['load_before']:.1f} -> "
          f"{result['load_after']:.1f}; ms per sample of {len(MODALITIES)} modalities")
    print("| step | today (full frame) | crop first (window) |")
    print("|---|---:|---:|")
    print(f"| to_unit | {rows['to_unit_full']['median'] * 1e3:.1f} | "
          f"{rows['to_unit_window']['median'] * 1e3:.1f} |")
    print(f"| to_unit + resize + crop | {rows['project']['median'] * 1e3:.1f} | "
          f"{rows['crop_first']['median'] * 1e3:.1f} |")
    print(f"cropping first would save at most {saving * 1e3:.1f} ms per sample, with a "
          "kernel as fast as torch's that resizes a window exactly")
    print(f"exact window (torch's kernel emulated, first repeat): "
          f"{rows['exact_window']['median'] * 1e3:.1f} ms per sample, bit-equal to today's "
          f"in {exact_equal}/{exact_n} frame-modalities: slower than today's path")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
