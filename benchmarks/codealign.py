"""CodeAlign on the generated sample: code size, reconstruction, code-loss cost, ablation.

    python benchmarks/codealign.py [--ks 64,256,1024] [--seeds 0,1] [--steps 60]
                                   [--parts size,step,ablation]

1. size: for each K, `cache-teacher --dense codebook:K` on the default (embedded) teacher;
   bytes per sample of uint16 codes (raw and on disk) against fp16 dense tokens, and the
   held-out reconstruction cosine per modality (what `pipeline cache-info` reports).
2. step: median training-step time (forward + backward + AdamW) of the student with and
   without the code loss (own + cross-modal FCF translators), same batches, interleaved.
3. ablation: full co-occurrence training; + codes; isolated (one modality per sample)
   without codes; isolated with codes; each over `--seeds`, MSS and system-level MISS mean
   mIoU on the val split, mean and std over seeds.

The embedded teacher has random weights (its codes carry no semantics), so the ablation
measures the mechanics, not CodeAlign's benefit; real checkpoints are needed for that.
Prints Markdown tables and writes benchmarks/results/codealign.json.
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

from pipeline import datasets
from pipeline.datasets.sample import SampleSpec, make_sample
from pipeline.store import describe, open_cache
from stages.student.codes import CodeTranslators, code_loss
from stages.student.data import AugmentConfig, ScheduleSampler, StudentData
from stages.student.evaluate import evaluate, flat_metrics, load_checkpoint
from stages.student.model import StudentConfig, build_student
from stages.student.train import TrainConfig, load_codes, load_targets, train
from stages.teacher.default_teacher import write_default_teacher
from stages.teacher.run import TeacherConfig, cache_teacher

MODS = ["rgb", "depth", "event", "lidar"]
ABLATION = {
    "full (co-occurring)": (False, 0.0),
    "full + codes": (False, 1.0),
    "isolated, no codes": (True, 0.0),
    "isolated + codes": (True, 1.0),
}


def size_part(root: Path, tmp: Path, ks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        out = tmp / f"dense{k}.zarr"
        t0 = time.perf_counter()
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(out),
                                    teacher_root=str(root / "teacher"), dense=f"codebook:{k}",
                                    dense_fit_samples=256, dense_heldout=32))
        d = describe(out)["dense"]
        rows.append({"k": k, "grid": d["grid"], "dim": open_cache(out).dim,
                     **d["bytes_per_sample"], "ratio_raw": d["ratio_raw"],
                     "ratio_on_disk": d["ratio_on_disk"], "codebook_bytes": d["codebook_bytes"],
                     "reconstruction_cosine": d["reconstruction_cosine"],
                     "mean_cosine": round(float(np.mean(list(
                         d["reconstruction_cosine"].values()))), 4),
                     "heldout_samples": d["heldout_samples"],
                     "build_seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows


def step_part(root: Path, cache: Path, steps: int) -> dict[str, Any]:
    """Median step time with and without the code loss on the same batches."""
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache), steps=steps,
                      batch_size=4, crop=128)
    samples = datasets.load("sample", root, "train", modalities=MODS)
    store = open_cache(cache)
    targets = load_targets(store, samples, MODS, cfg)
    books = load_codes(store, targets, samples.ids, MODS)
    data = StudentData(samples, MODS, targets, 128, AugmentConfig(), 0)
    batches = [torch.utils.data.default_collate([data[key] for key in keys])
               for keys in ScheduleSampler(len(samples), 4, 4, 0)]
    torch.manual_seed(0)
    model = build_student(StudentConfig(embed_dim=128), MODS, len(samples.classes))
    tr = CodeTranslators(MODS, model.encoder.channels[-1], books.shape[1], books)
    opt = torch.optim.AdamW([*model.parameters(), *tr.parameters()], lr=1e-4)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * steps + 2):
        with_codes = bool(i % 2)
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        out = model(batch["images"], batch["present"])
        loss = torch.nn.functional.cross_entropy(
            torch.nn.functional.interpolate(out.logits, size=batch["label"].shape[-2:],
                                            mode="bilinear"), batch["label"], ignore_index=255)
        if with_codes:
            loss = loss + code_loss(tr, out.feats[-1], batch["present"], batch["codes"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= 2:  # the first of each is warm-up
            times[with_codes].append(time.perf_counter() - t0)
    base, coded = statistics.median(times[False]), statistics.median(times[True])
    return {"steps_each": steps, "base_s": round(base, 4), "with_codes_s": round(coded, 4),
            "overhead_pct": round(100 * (coded / base - 1), 1),
            "translator_params": sum(p.numel() for p in tr.parameters()),
            "student_params": sum(p.numel() for p in model.parameters())}


def ablation_part(root: Path, cache: Path, tmp: Path, seeds: list[int], steps: int
                  ) -> list[dict[str, Any]]:
    val = datasets.load("sample", root, "val", modalities=MODS)
    rows = []
    for name, (isolation, w_code) in ABLATION.items():
        runs = []
        for seed in seeds:
            t0 = time.perf_counter()
            cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                              out=str(tmp / f"{name}-{seed}".replace(" ", "_")), steps=steps,
                              batch_size=4, crop=128, lr=1e-3, workers=0, seed=seed,
                              checkpoint_every=steps, val_limit=2, isolation=isolation,
                              loss={"w_code": w_code})
            train(StudentConfig(embed_dim=128), cfg, progress=False)
            model, _ = load_checkpoint(Path(cfg.out) / "last.pt")
            flat = flat_metrics(evaluate(model, val, ("mss", "miss")))
            runs.append({"seed": seed, "mss": flat["mss"]["mIoU"],
                         "miss_mean": flat["miss"]["mean_mIoU"],
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(name, runs[-1], flush=True)

        rows.append({"variant": name, "runs": runs, "mss": _mean_std(runs, "mss"),
                     "miss_mean": _mean_std(runs, "miss_mean")})
    return rows


def _mean_std(runs: list[dict[str, Any]], key: str) -> tuple[float, float]:
    v = [r[key] for r in runs]
    return round(statistics.mean(v), 2), round(statistics.stdev(v), 2) if len(v) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="64,256,1024")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--step-repeats", type=int, default=10)
    parser.add_argument("--parts", default="size,step,ablation")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codealign.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    parts = args.parts.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {"benchmark": "codealign", "cpu_count": os.cpu_count(),
                              "machine": platform.machine(),
                              "load_average": os.getloadavg()[0]}
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run stopped midway keeps what it measured
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = tmp / "deliver-sample"
        spec = SampleSpec(size=128, train=64, val=24, test=8, frames_per_scene=4, seed=0)
        make_sample(root, spec)
        write_default_teacher(root / "teacher")
        if "size" in parts:
            result["size"] = size_part(root, tmp, ks)
            save()
        cache = tmp / "codes.zarr"
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                    teacher_root=str(root / "teacher"),
                                    dense=f"codebook:{min(ks)}"))
        if "step" in parts:
            result["step"] = step_part(root, cache, args.step_repeats)
            print(result["step"], flush=True)
            save()
        if "ablation" in parts:
            result["ablation"] = ablation_part(root, cache, tmp, seeds, args.steps)
            result["ablation_setup"] = {"steps": args.steps, "seeds": seeds, "k": min(ks),
                                        "student": "mit_b0, embed 128, batch 4, crop 128",
                                        "sample": vars(spec) if hasattr(spec, "__dict__")
                                        else str(spec)}
    result["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
    result["load_average_end"] = os.getloadavg()[0]
    if "size" in result:
        print("\n| K | grid | D | codes B/sample (raw / disk) | fp16 tokens B/sample | ratio raw "
              "| ratio disk | cosine rgb / depth / event / lidar (mean) |")
        print("|---:|---|---:|---|---:|---:|---:|---|")
        for r in result["size"]:
            cos = " / ".join(f"{c:.3f}" for c in r["reconstruction_cosine"].values())
            print(f"| {r['k']} | {r['grid'][0]}x{r['grid'][1]} | {r['dim']} | "
                  f"{r['codes_uint16']} / {r['codes_on_disk']:.0f} | {r['fp16_tokens']} | "
                  f"{r['ratio_raw']:g}x | {r['ratio_on_disk']:g}x | {cos} ({r['mean_cosine']}) |")
    if "step" in result:
        s = result["step"]
        print(f"\nstep: {s['base_s']} s without, {s['with_codes_s']} s with the code loss "
              f"({s['overhead_pct']:+.1f} %), translators {s['translator_params']} params")
    if "ablation" in result:
        print(f"\n| variant ({args.steps} steps, seeds {args.seeds}) | MSS mIoU | MISS mean mIoU |")
        print("|---|---:|---:|")
        for r in result["ablation"]:
            print(f"| {r['variant']} | {r['mss'][0]} ± {r['mss'][1]} | "
                  f"{r['miss_mean'][0]} ± {r['miss_mean'][1]} |")
    print(f"\n{result['total_minutes']} min in all, load average {result['load_average']:.1f} "
          f"at start, {result['load_average_end']:.1f} at end")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
