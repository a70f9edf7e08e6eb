"""Ablations of the paper's Tables 5 and 6 and of CodeAlign on the generated sample, with seeds.

    python benchmarks/ablation_sample.py [--seeds 3] [--steps 300] [--crop 128] [--jobs 2]
                                         [--val-stride 1] [--variants default|codealign|ROWS]
                                         [--dense 256] [--work DIR]

Generates the sample (or reads --root), fits the default teacher with the settings of
params.yaml (`teacher.fit`, `teacher.modality_branch`, `teacher.class_prompt`), caches it,
then trains every variant once per seed (train.seed = 3407 + i: the same initial weights
and batches for every variant of one seed) and evaluates the final weights on the val
split (every `--val-stride`-th frame: evaluation costs 16 passes over it, more than a
short training): MSS mIoU and the mean mIoU over the 15 system-level MISS subsets. Prints a
Markdown table of mean ± sample std over seeds, the gaps to "CE only" with whether they
exceed two standard deviations, and writes JSON (default
benchmarks/results/ablation_sample.json).

`--variants teacher_codes` runs issue 17's four rows: "full model", "+ codes" (the full model
plus the own and cross-modal FCF code loss), "isolated" (train.single_modality: one modality per
training sample, no codes) and "isolated + codes". When a selected row has codes the cache
is built once with `--dense K` patch codes (`codebook:K`; default 256: on the fitted
teacher its held-out reconstruction cosine is 0.969 mean, 0.953 for the worst modality,
benchmarks/teacher_codes.py). The pooled targets of such a store are bit for bit those of a
plain one (tests/test_codealign.py), so the rows without codes train on exactly what they
would read from a plain cache. The code rows use
`--loss w_teacher_code=...`, default 0.5: the code cross-entropy starts at ln K = 5.5 for K = 256,
against ln 25 = 3.2 for L_sup, so 0.5 starts the code term at about the size of L_sup
instead of 1.7x it (with w_cr = w_se = 1 the distillation terms already compete with CE on
short runs). Every other row trains with w_teacher_code = 0. Beside the gaps to "CE only", the
CodeAlign rows are compared with "full model", and "isolated + codes" with "isolated":
the issue's target is isolated training with codes closer to full training than without,
beyond the seed spread (MISS mean).

The row "+ decoded codes" (not in a group; name it in --variants) is "+ codes" plus issue
17's decoded-code target, train.loss.w_teacher_decoded: 1 - cosine between each translation's
soft-decoded vector (softmax over the codes times the frozen codebook) and the teacher's
code vector. `--loss w_teacher_decoded=...` sets its weight, default 1.0: the term lies in [0, 2]
and starts below 1 (a near-uniform soft assignment decodes to the codebook's mean, which
already points roughly along most code vectors), so at 1.0 it starts well under L_sup (3.2)
and the code term (0.5 x 5.5), adding a feature-space pull without outweighing either. It
is compared with "+ codes". Every other row trains with w_teacher_decoded = 0.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variant:
    """What a row changes against the full model (params.yaml plus --mff / --loss)."""

    mff: dict[str, Any] = field(default_factory=dict)  # student.mff
    loss: dict[str, Any] = field(default_factory=dict)  # train.loss
    student: dict[str, Any] = field(default_factory=dict)  # other student settings
    single_modality: bool = False  # train.single_modality: one modality per training sample
    codes: bool = False  # the FCF code loss (w_teacher_code > 0; needs a cache with dense codes)
    decoded: bool = False  # the decoded-code target too (w_teacher_decoded > 0; needs codes)


VARIANTS: dict[str, Variant] = {
    "full model": Variant(),
    "CE only": Variant(loss={"w_cr": 0.0, "w_se": 0.0}),
    "no L_cr": Variant(loss={"w_cr": 0.0}),
    "no L_se": Variant(loss={"w_se": 0.0}),
    "mean fusion (no MFF)": Variant(mff={"reweight": False, "select": False}),
    "MFF without selection": Variant(mff={"select": False}),
    "MFF author": Variant(mff={"variant": "author"}),
    "MFF paper": Variant(mff={"variant": "paper"}),
    "MFF pixel": Variant(mff={"variant": "pixel"}),
    "+ codes": Variant(codes=True),
    "+ decoded codes": Variant(codes=True, decoded=True),
    "isolated": Variant(single_modality=True),
    "isolated + codes": Variant(single_modality=True, codes=True),
    # issue 14's search for an LSCD setting that helps (weights, ramp, temperature)
    "LSCD x0.3": Variant(loss={"w_cr": 0.3, "w_se": 0.3}),
    "LSCD x0.1": Variant(loss={"w_cr": 0.1, "w_se": 0.1}),
    "LSCD warm-up 0.5": Variant(loss={"distill_warmup": 0.5}),
    "LSCD x0.3 warm-up 0.5": Variant(loss={"w_cr": 0.3, "w_se": 0.3, "distill_warmup": 0.5}),
    "L_cr only x0.3": Variant(loss={"w_cr": 0.3, "w_se": 0.0}),
    "L_se with identity target": Variant(loss={"se_target": "identity"}),
}
GROUPS = {
    "default": ("full model", "CE only", "no L_cr", "no L_se", "mean fusion (no MFF)",
                "MFF without selection", "MFF author", "MFF paper", "MFF pixel"),
    "teacher_codes": ("full model", "+ codes", "isolated", "isolated + codes"),
    "lscd": ("CE only", "full model", "LSCD x0.3", "LSCD x0.1", "LSCD warm-up 0.5",
             "LSCD x0.3 warm-up 0.5", "L_cr only x0.3", "L_se with identity target"),
}
BASELINE = "CE only"
# the teacher-code rows' comparisons (row, reference), beside every row's gap to BASELINE
COMPARISONS = (("+ codes", "full model"), ("isolated", "full model"),
               ("isolated + codes", "full model"), ("isolated + codes", "isolated"),
               ("+ decoded codes", "+ codes"))
DEFAULT_DENSE_K = 256
DEFAULT_W_CODE = 0.5  # see the module docstring
DEFAULT_W_DECODED = 1.0  # see the module docstring
METRICS = ("mss_mIoU", "miss_mean_mIoU")


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (variant, seed) and evaluate it; runs in a worker process."""
    import torch

    torch.set_num_threads(job["threads"])
    from pipeline import datasets
    from stages.student.config import TrainConfig
    from stages.student.evaluate import evaluate, flat_metrics, load_checkpoint
    from stages.student.model import StudentConfig
    from stages.student.train import train

    variant = VARIANTS[job["variant"]]
    student = StudentConfig(backbone="mit_b0", embed_dim=128, mff=job["mff"], **variant.student)
    cfg = TrainConfig(dataset="sample", root=job["root"], cache=job["cache"], out=job["out"],
                      steps=job["steps"], batch_size=4, crop=job["crop"], lr=1e-3,
                      workers=job["workers"], checkpoint_every=job["steps"], val_limit=1,
                      seed=job["seed"], loss=job["loss"], single_modality=variant.single_modality)
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


def gap(entry: dict[str, Any], reference: dict[str, Any], key: str
        ) -> tuple[float, bool | None]:
    """`entry`'s mean minus `reference`'s, and whether it exceeds twice the larger of the
    two seed spreads (None with a single seed: no spread to compare with)."""
    diff = entry[key][0] - reference[key][0]
    noise = 2 * max(entry[key][1], reference[key][1])
    return round(diff, 4), bool(abs(diff) > noise) if math.isfinite(noise) else None


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Mean and sample std over seeds per variant, the gap to the baseline and, for the
    CodeAlign rows, the gaps of COMPARISONS (under "vs": reference -> key -> gap)."""
    def stats(values: list[float]) -> tuple[float, float]:
        return (round(statistics.fmean(values), 4),
                round(statistics.stdev(values), 4) if len(values) > 1 else float("nan"))

    table = []
    for name in variants:
        mine = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["seed"])
        entry: dict[str, Any] = {"variant": name, "seeds": len(mine)}
        for key in METRICS:
            entry[key] = stats([r[key] for r in mine])
        table.append(entry)
    by_name = {t["variant"]: t for t in table}
    base = by_name.get(BASELINE)
    for entry in table:
        if base is None or entry is base:
            continue
        for key in METRICS:
            entry[f"{key}_gap"], entry[f"{key}_beyond_2std"] = gap(entry, base, key)
    for name, ref in COMPARISONS:
        if name not in by_name or ref not in by_name:
            continue
        gaps = by_name[name].setdefault("vs", {}).setdefault(ref, {})
        for key in METRICS:
            diff, beyond = gap(by_name[name], by_name[ref], key)
            gaps[key] = {"gap": diff, "beyond_2std": beyond}
    return table


def teacher_codes_target(table: list[dict[str, Any]], key: str = "miss_mean_mIoU"
                     ) -> dict[str, Any] | None:
    """The issue's target on `key`: is "isolated + codes" closer to "full model" than
    "isolated" is, and are the two isolated rows apart by more than 2 std? None unless all
    three rows ran."""
    rows = {t["variant"]: t for t in table}
    if not {"full model", "isolated", "isolated + codes"} <= rows.keys():
        return None
    full, iso, coded = rows["full model"], rows["isolated"], rows["isolated + codes"]
    without, with_codes = gap(iso, full, key)[0], gap(coded, full, key)[0]
    apart, beyond = gap(coded, iso, key)
    closer = abs(with_codes) < abs(without)
    return {"metric": key, "isolated_vs_full": without, "isolated_codes_vs_full": with_codes,
            "codes_vs_no_codes": apart, "closer": closer, "beyond_2std": beyond,
            "met": None if beyond is None else closer and beyond}


def fmt(stat: tuple[float, float]) -> str:
    mean, std = stat
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def fmt_gap(diff: float, beyond: bool | None) -> str:
    return f"{diff:+.2f}" + {True: " (> 2 std)", False: " (within 2 std)",
                             None: " (1 seed: no spread)"}[beyond]


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
    parser.add_argument("--variants", default="default",
                        help="rows, comma-separated, or a group: " + "; ".join(
                            f"{g} = {', '.join(rows)}" for g, rows in GROUPS.items())
                        + " (a row equal to the default is skipped and reported as "
                        "`full model`)")
    parser.add_argument("--dense", type=int, default=DEFAULT_DENSE_K, metavar="K",
                        help="codebook size of the cache's patch codes, built only when a "
                        "row has codes")
    parser.add_argument("--mff", action="append", default=[], metavar="KEY=VALUE",
                        help="student.mff setting for every row (default: params.yaml)")
    parser.add_argument("--loss", action="append", default=[], metavar="KEY=VALUE",
                        help="train.loss setting for every row (default: params.yaml); "
                        f"w_teacher_code applies to the rows with codes only (default "
                        f"{DEFAULT_W_CODE}), w_teacher_decoded to '+ decoded codes' only "
                        f"(default {DEFAULT_W_DECODED})")
    parser.add_argument("--teacher-frames", type=int, default=None, metavar="N",
                        help="fit the teacher on another generated sample with N training "
                        "frames (seed 1, scenes the student never sees) instead of the "
                        "student's 120; the student still trains on its own sample")
    parser.add_argument("--fit", action="append", default=[], metavar="KEY=VALUE",
                        help="teacher.fit setting (default: params.yaml), e.g. image_epochs")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training")
    parser.add_argument("--workers", type=int, default=1, help="data workers per training")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="teacher.fit / modality_branch / class_prompt and train.loss")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON result (default: benchmarks/results/ablation_sample.json, "
                        "or ablation_teacher_codes.json when a row has codes or single_modality)")
    args = parser.parse_args()
    variants = [v for name in args.variants.split(",") for v in GROUPS.get(name, (name,))]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}; "
                     f"groups: {', '.join(GROUPS)}")
    if args.val_stride < 1:
        parser.error("--val-stride must be >= 1")
    if args.dense < 2:
        parser.error("--dense must be >= 2 codes")
    import yaml

    def pairs(items: list[str]) -> dict[str, Any]:
        return {k: yaml.safe_load(v) for k, _, v in (i.partition("=") for i in items)}

    codealign = any(VARIANTS[v].codes or VARIANTS[v].single_modality for v in variants)
    out = args.out or Path("benchmarks/results/" + (
        "ablation_teacher_codes.json" if codealign else "ablation_sample.json"))
    dense_k = args.dense if any(VARIANTS[v].codes for v in variants) else None
    w_teacher_code = pairs(args.loss).get("w_teacher_code", DEFAULT_W_CODE)
    if dense_k and not (isinstance(w_teacher_code, int | float) and w_teacher_code > 0):
        parser.error(f"--loss w_teacher_code={w_teacher_code} turns the code loss of the code "
                     "rows off; give a weight > 0 or leave the code rows out of --variants")
    w_teacher_decoded = pairs(args.loss).get("w_teacher_decoded", DEFAULT_W_DECODED)
    decoded = any(VARIANTS[v].decoded for v in variants)
    if decoded and not (isinstance(w_teacher_decoded, int | float) and w_teacher_decoded > 0):
        parser.error(f"--loss w_teacher_decoded={w_teacher_decoded} turns the decoded-code "
                     "target of '+ decoded codes' off; give a weight > 0 or leave that row out")
    from fitted_sample import build_cache, fitted_sample, store_path

    from pipeline.config import load_params
    from pipeline.synth import SampleSpec

    params = load_params(args.params)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        work = args.work or tmp
        fit_spec = (None if args.teacher_frames is None else
                    SampleSpec(train=args.teacher_frames, test=0, seed=1))
        sample = fitted_sample(work, params, args.root, fit_spec=fit_spec,
                               fit_overrides=pairs(args.fit))
        print(sample.describe_quality(), flush=True)
        # one cache for every row; with codes its pooled targets equal a plain cache's
        cache = store_path(work, dense_k, sample.tag)
        build_cache(sample, cache, dense_k)
        base_mff = {**((params.get("student") or {}).get("mff") or {}), **pairs(args.mff)}
        base_loss = {**((params.get("train") or {}).get("loss") or {}), **pairs(args.loss)}
        default_variant = base_mff.get("variant", "pixel")
        # the row naming the default variant is the full model itself
        variants = [v for v in variants if not (v == f"MFF {default_variant}"
                                                and "full model" in variants)]
        jobs = [{"variant": v, "seed": 3407 + s, "root": str(sample.root), "cache": str(cache),
                 "out": str(tmp / f"{v.replace(' ', '_')}-{s}"), "steps": args.steps,
                 "crop": args.crop, "threads": args.threads, "workers": args.workers,
                 "val_stride": args.val_stride,
                 "loss": {**base_loss, **VARIANTS[v].loss,
                          "w_teacher_code": w_teacher_code if VARIANTS[v].codes else 0.0,
                          "w_teacher_decoded": w_teacher_decoded if VARIANTS[v].decoded else 0.0},
                 "mff": {**base_mff, **VARIANTS[v].mff}}
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
    target = teacher_codes_target(table)
    print(f"\n{args.seeds} seeds x {len(variants)} variants, {args.steps} steps each, mit_b0, "
          f"batch 4 x 4 modalities, crop {args.crop}, val every {args.val_stride}, "
          f"MFF {default_variant} unless named, "
          + (f"codes K = {dense_k}, w_teacher_code {w_teacher_code}, " if dense_k else "")
          + (f"w_teacher_decoded {w_teacher_decoded}, " if decoded else "")
          + f"{args.jobs} job(s) x {args.threads} thread(s), {os.cpu_count()} cores, "
          f"{total:.1f} min in all")
    with_base = any("miss_mean_mIoU_gap" in t for t in table)
    print("| variant | MSS mIoU | MISS mean mIoU |" + (f" MISS gap to {BASELINE} |"
                                                       if with_base else ""))
    print("|---|---:|---:|" + ("---:|" if with_base else ""))
    for t in table:
        note = fmt_gap(t["miss_mean_mIoU_gap"], t["miss_mean_mIoU_beyond_2std"]) \
            if "miss_mean_mIoU_gap" in t else ""
        print(f"| {t['variant']} | {fmt(t['mss_mIoU'])} | {fmt(t['miss_mean_mIoU'])} |"
              + (f" {note} |" if with_base else ""))
    compared = [(t["variant"], ref, gaps) for t in table for ref, gaps in t.get("vs", {}).items()]
    if compared:
        print("\n| CodeAlign comparison | MSS gap | MISS mean gap |")
        print("|---|---:|---:|")
        for name, ref, gaps in compared:
            print(f"| {name} vs {ref} | "
                  + " | ".join(fmt_gap(gaps[k]["gap"], gaps[k]["beyond_2std"]) for k in METRICS)
                  + " |")
    if target is not None:
        verdict = {True: "met", False: "not met", None: "undecided (1 seed)"}[target["met"]]
        print(f"\ntarget, isolated + codes closer to full model than isolated (MISS mean) "
              f"beyond the seed spread: {verdict} (isolated {target['isolated_vs_full']:+.2f}, "
              f"isolated + codes {target['isolated_codes_vs_full']:+.2f} vs full model; "
              f"codes vs no codes {fmt_gap(target['codes_vs_no_codes'], target['beyond_2std'])})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "ablation_sample", "seeds": args.seeds, "steps": args.steps,
        "crop": args.crop, "val_stride": args.val_stride, "jobs": args.jobs,
        "threads": args.threads, "mff": base_mff,
        "loss": base_loss, "dense_k": dense_k,
        "w_code_of_code_rows": w_teacher_code if dense_k else None,
        "w_decoded_of_decoded_rows": w_teacher_decoded if decoded else None,
        "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "total_minutes": round(total, 2), "teacher_quality": sample.quality,
        "teacher_fitted_on": ({"train_frames": args.teacher_frames, "seed": 1,
                               "fit": pairs(args.fit)} if args.teacher_frames else
                              {"train_frames": "the student's sample", "fit": pairs(args.fit)}),
        "table": table, "teacher_codes_target": target, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
