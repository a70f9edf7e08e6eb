"""Ablations of the paper's Tables 5 and 6 on the generated sample, with seeds.

    python benchmarks/ablation_sample.py [--seeds 3] [--steps 300] [--crop 128] [--jobs 2]
                                         [--val-stride 1]

Generates the sample (or reads --root), fits the default teacher with the settings of
params.yaml (`teacher.fit`, `teacher.modality_branch`, `teacher.class_prompt`), caches it,
then trains every variant once per seed (train.seed = 3407 + i: the same initial weights
and batches for every variant of one seed) and evaluates the final weights on the val
split (every `--val-stride`-th frame: evaluation costs 16 passes over it, more than a
short training): MSS mIoU and the mean mIoU over the 15 system-level MISS subsets. Prints a
Markdown table of mean ± sample std over seeds, the gaps to "CE only" with whether they
exceed two standard deviations, and writes JSON (default
benchmarks/results/ablation_sample.json).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

# variant -> (student.mff overrides, train.loss overrides, other student overrides)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "full model": ({}, {}, {}),
    "CE only": ({}, {"w_cr": 0.0, "w_se": 0.0}, {}),
    "no L_cr": ({}, {"w_cr": 0.0}, {}),
    "no L_se": ({}, {"w_se": 0.0}, {}),
    "mean fusion (no MFF)": ({"reweight": False, "select": False}, {}, {}),
    "MFF without selection": ({"select": False}, {}, {}),
    "MFF author": ({"variant": "author"}, {}, {}),
    "MFF paper": ({"variant": "paper"}, {}, {}),
    "MFF pixel": ({"variant": "pixel"}, {}, {}),
}
DEFAULT_ROWS = ("full model", "CE only", "no L_cr", "no L_se", "mean fusion (no MFF)",
                "MFF without selection", "MFF author", "MFF paper", "MFF pixel")
BASELINE = "CE only"


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, seed) and evaluate it; runs in a worker process."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline import datasets
    from stages.student.evaluate import evaluate, flat_metrics, load_checkpoint
    from stages.student.model import StudentConfig
    from stages.student.train import TrainConfig, train

    mff, loss, other = VARIANTS[job["variant"]]
    student = StudentConfig(backbone="mit_b0", embed_dim=128,
                            mff={**job["mff"], **mff}, **other)
    cfg = TrainConfig(dataset="sample", root=job["root"], cache=job["cache"], out=job["out"],
                      steps=job["steps"], batch_size=4, crop=job["crop"], lr=1e-3,
                      workers=job["workers"], checkpoint_every=job["steps"], val_limit=1,
                      seed=job["seed"], loss={**job["loss"], **loss})
    t0 = time.perf_counter()
    summary = train(student, cfg, progress=False)
    model, meta = load_checkpoint(Path(cfg.out) / "last.pt")
    val = datasets.load("sample", job["root"], "val", modalities=meta["modalities"])
    val = val[::job["val_stride"]]
    flat = flat_metrics(evaluate(model, val, ("mss", "miss"), progress=False))
    return {"variant": job["variant"], "seed": job["seed"], "mss_mIoU": flat["mss"]["mIoU"],
            "miss_mean_mIoU": flat["miss"]["mean_mIoU"],
            "final_loss": round(summary["last_loss"], 3),
            "minutes": round((time.perf_counter() - t0) / 60, 2)}


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per variant, and the gap to the baseline."""
    def stats(values: list[float]) -> tuple[float, float]:
        return (statistics.fmean(values),
                statistics.stdev(values) if len(values) > 1 else float("nan"))

    table = []
    for name in variants:
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {"variant": name, "seeds": len(mine)}
        for key in ("mss_mIoU", "miss_mean_mIoU"):
            entry[key] = stats([r[key] for r in mine])
        table.append(entry)
    base = next((t for t in table if t["variant"] == BASELINE), None)
    for entry in table:
        if base is None or entry is base:
            continue
        for key in ("mss_mIoU", "miss_mean_mIoU"):
            gap = entry[key][0] - base[key][0]
            noise = 2 * max(entry[key][1], base[key][1])
            entry[f"{key}_gap"] = gap
            entry[f"{key}_beyond_2std"] = bool(abs(gap) > noise) if math.isfinite(noise) \
                else None
    return table


def fmt(stat: tuple[float, float]) -> str:
    mean, std = stat
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--val-stride", type=int, default=1,
                        help="evaluate every N-th val frame (all conditions stay in)")
    parser.add_argument("--root", type=Path, default=None,
                        help="an existing sample (default: generate one in a temp folder)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the fitted teacher and the cache here and reuse them on "
                        "the next run (default: a temp folder)")
    parser.add_argument("--variants", default=",".join(DEFAULT_ROWS),
                        help="rows, comma-separated (a row equal to the default is skipped "
                        "and reported as `full model`)")
    parser.add_argument("--mff", action="append", default=[], metavar="KEY=VALUE",
                        help="student.mff setting for every row (default: params.yaml)")
    parser.add_argument("--loss", action="append", default=[], metavar="KEY=VALUE",
                        help="train.loss setting for every row (default: params.yaml)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--workers", type=int, default=1, help="data workers per training")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="teacher.fit / modality_branch / class_prompt and train.loss")
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/ablation_sample.json"))
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    if args.val_stride < 1:
        parser.error("--val-stride must be >= 1")
    import yaml

    def pairs(items: list[str]) -> dict[str, Any]:
        return {k: yaml.safe_load(v) for k, _, v in (i.partition("=") for i in items)}

    from pipeline.config import build, load_params
    from pipeline.datasets.sample import SampleSpec, make_sample
    from stages.teacher.fit import FitConfig, fit_default_teacher, format_quality
    from stages.teacher.run import TeacherConfig, cache_teacher

    params = load_params(args.params)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = args.work or tmp
        root = args.root or work / "deliver-sample"
        make_sample(root, SampleSpec())
        teacher_cfg = TeacherConfig.from_params(params, {"dataset": "sample", "root": str(root)})
        fit = build(FitConfig, dict((params.get("teacher") or {}).get("fit") or {}), "teacher.fit")
        fitted = fit_default_teacher(root, work / "teacher", fit, teacher_cfg.branch_map(),
                                     teacher_cfg.class_prompt, progress=False)
        quality = fitted.manifest["quality"]
        print(format_quality(quality, fitted.manifest["random_init_quality"]), flush=True)
        cache = work / "sample.zarr"
        teacher_cfg.out, teacher_cfg.teacher_root = str(cache), str(work / "teacher")
        teacher_cfg.overwrite = True  # a cache of an earlier teacher in --work is rebuilt
        cache_teacher(teacher_cfg)
        base_mff = {**((params.get("student") or {}).get("mff") or {}), **pairs(args.mff)}
        base_loss = {**((params.get("train") or {}).get("loss") or {}), **pairs(args.loss)}
        default_variant = base_mff.get("variant", "pixel")
        # the row naming the default variant is the full model itself
        variants = [v for v in variants if not (v == f"MFF {default_variant}"
                                                and "full model" in variants)]
        jobs = [{"variant": v, "seed": 3407 + s, "root": str(root), "cache": str(cache),
                 "out": str(tmp / f"{v.replace(' ', '_')}-{s}"), "steps": args.steps,
                 "crop": args.crop, "threads": args.threads, "workers": args.workers,
                 "val_stride": args.val_stride,
                 "loss": base_loss, "mff": base_mff}
                for s in range(args.seeds) for v in variants]
        rows = []
        if args.jobs > 1:  # worker processes may start their own data-loader workers
            with ProcessPoolExecutor(args.jobs, mp.get_context("spawn")) as pool:
                for future in as_completed([pool.submit(run_one, job) for job in jobs]):
                    rows.append(future.result())
                    print(rows[-1], flush=True)
        else:
            for job in jobs:
                rows.append(run_one(job))
                print(rows[-1], flush=True)
    total = (time.perf_counter() - start) / 60
    table = summarise(rows, variants)
    print(f"\n{args.seeds} seeds x {len(variants)} variants, {args.steps} steps each, mit_b0, "
          f"batch 4 x 4 modalities, crop {args.crop}, val every {args.val_stride}, "
          f"MFF {default_variant} unless named, "
          f"{args.jobs} job(s) x {args.threads} thread(s), {os.cpu_count()} cores, "
          f"{total:.1f} min in all")
    print("| variant | MSS mIoU | MISS mean mIoU | MISS gap to CE only |")
    print("|---|---:|---:|---:|")
    for t in table:
        gap = t.get("miss_mean_mIoU_gap")
        note = "" if gap is None else f"{gap:+.2f}" + (
            " (> 2 std)" if t["miss_mean_mIoU_beyond_2std"] else " (within 2 std)")
        print(f"| {t['variant']} | {fmt(t['mss_mIoU'])} | {fmt(t['miss_mean_mIoU'])} | "
              f"{note} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "ablation_sample", "seeds": args.seeds, "steps": args.steps,
        "crop": args.crop, "val_stride": args.val_stride, "jobs": args.jobs,
        "threads": args.threads, "mff": base_mff,
        "loss": base_loss,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "total_minutes": round(total, 2), "teacher_quality": quality,
        "table": table, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
