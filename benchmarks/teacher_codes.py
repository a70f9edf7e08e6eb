"""Teacher-code compression (not CodeAlign) on the generated sample: code size,
reconstruction, and the code loss's step cost.

    python benchmarks/teacher_codes.py [--ks 64,256,1024] [--step-k 256] [--step-repeats 20]
                                   [--parts size,step] [--work DIR]

Both parts read the **fitted** default teacher of params.yaml (`teacher.fit`), fitted on
the default generated sample (`--work` keeps sample, teacher and stores for the next
run).

1. size: for each K, `cache-teacher --dense codebook:K`; bytes per sample of the uint16
   codes (raw and on disk) against fp16 dense tokens, and the held-out reconstruction
   cosine per modality (what `pipeline cache-info` reports); which K first reaches a
   mean cosine >= 0.9 (the issue's target).
2. step: median training-step time (forward + backward + AdamW, mit_b0, batch 4 x all
   modalities) of the student with and without the code loss (own + cross-modal FCF
   translators, K = --step-k), each pair of steps on the same batch, interleaved, so that
   load from other jobs hits both alike. The base step is CE only: the overhead is the
   larger of what it would be against a full LSCD step (goal <= 15 %).

The 4-row ablation (full, + codes, isolated, isolated + codes) is
`python benchmarks/ablation_sample.py --plan benchmarks/plans/teacher_codes.yaml
--project-set teacher.dense=codebook:256` (`pipeline ablate` on the sample).
Prints Markdown tables and writes benchmarks/results/teacher_codes.json after every part.
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
from fitted_sample import FittedSample, build_cache, fitted_sample, store_path

from any2seg import datasets
from any2seg.config import load_params
from any2seg.store import describe, open_cache
from stages.student.codes import CodeTranslators, code_loss
from stages.student.config import TrainConfig
from stages.student.data import AugmentConfig, ScheduleSampler, StudentData
from stages.student.model import StudentConfig, build_student
from stages.student.train import load_codes, load_targets

COSINE_TARGET = 0.9


def size_part(sample: FittedSample, work: Path, ks: list[int]) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        out = store_path(work, k)
        report = build_cache(sample, out, k)
        d = describe(out)["dense"]
        cos = d["reconstruction_cosine"]
        rows.append({"k": k, "grid": d["grid"], "dim": open_cache(out).dim,
                     **d["bytes_per_sample"], "ratio_raw": d["ratio_raw"],
                     "ratio_on_disk": d["ratio_on_disk"], "codebook_bytes": d["codebook_bytes"],
                     "reconstruction_cosine": cos,
                     "mean_cosine": round(float(np.mean(list(cos.values()))), 4),
                     "min_cosine": round(float(min(cos.values())), 4),
                     "heldout_samples": d["heldout_samples"],
                     # a store reused from --work was built by an earlier run
                     "build_seconds": round(report.seconds, 1)
                     if report.computed_rows else None})
        print(rows[-1], flush=True)
    return rows


def smallest_k(rows: list[dict[str, Any]], key: str, target: float = COSINE_TARGET
               ) -> int | None:
    """The smallest measured K whose `key` cosine reaches `target` (None: none does)."""
    return min((r["k"] for r in rows if r[key] >= target), default=None)


def step_part(sample: FittedSample, cache: Path, repeats: int, crop: int) -> dict[str, Any]:
    """Median step time with and without the code loss, each pair on the same batch."""
    store = open_cache(cache)
    mods = list(store.modalities)
    cfg = TrainConfig(dataset="sample", root=str(sample.root), cache=str(cache),
                      batch_size=4, crop=crop)
    samples = datasets.load("sample", sample.root, "train", modalities=mods)
    targets = load_targets(store, samples, mods, cfg)
    books = load_codes(store, targets, samples.ids, mods)
    data = StudentData(samples, mods, targets, crop, AugmentConfig(), 0)
    batches = [torch.utils.data.default_collate([data[key] for key in keys])
               for keys in ScheduleSampler(len(samples), 4, repeats + 1, 0)]
    torch.manual_seed(0)
    model = build_student(StudentConfig(embed_dim=128), mods, len(samples.classes))
    tr = CodeTranslators(mods, model.encoder.channels[-1], books.shape[1], books)
    opt = torch.optim.AdamW([*model.parameters(), *tr.parameters()], lr=1e-4)
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(2 * (repeats + 1)):
        with_codes = bool(i % 2)
        batch = batches[i // 2]
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
        if i >= 2:  # the first pair is warm-up
            times[with_codes].append(time.perf_counter() - t0)
    base, coded = statistics.median(times[False]), statistics.median(times[True])
    return {"k": int(books.shape[1]), "steps_each": repeats, "crop": crop,
            "threads": torch.get_num_threads(), "base_s": round(base, 4),
            "with_codes_s": round(coded, 4), "overhead_pct": round(100 * (coded / base - 1), 1),
            "translator_params": sum(p.numel() for p in tr.parameters()),
            "student_params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="64,256,1024", help="codebook sizes of the size part")
    parser.add_argument("--step-k", type=int, default=256, help="codebook size of the step part")
    parser.add_argument("--step-repeats", type=int, default=20,
                        help="timed steps with and without the code loss (after one warm-up)")
    parser.add_argument("--crop", type=int, default=128, help="crop of the step part")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--parts", default="size,step")
    parser.add_argument("--root", type=Path, default=None,
                        help="an existing sample (default: generate one in --work)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the sample, the fitted teacher and the stores here and "
                        "reuse them on the next run (default: a temp folder)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="teacher.fit / modality_branch / class_prompt")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teacher_codes.json"))
    args = parser.parse_args()
    parts = args.parts.split(",")
    if set(parts) - {"size", "step"}:
        parser.error(f"--parts takes size and/or step, got {args.parts!r} (the ablation is "
                     "ablation_sample.py --plan benchmarks/plans/teacher_codes.yaml)")
    ks = [int(k) for k in args.ks.split(",")]
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"benchmark": "teacher_codes", "cpu_count": os.cpu_count(),
                              "machine": platform.machine(),
                              "load_average": os.getloadavg()[0]}
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part: a run stopped midway keeps what it measured
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    with tempfile.TemporaryDirectory() as tmp_name:
        work = args.work or Path(tmp_name)
        sample = fitted_sample(work, load_params(args.params), args.root)
        print(sample.describe_quality(), flush=True)
        result["teacher_quality"] = sample.quality
        if "size" in parts:
            result["size"] = size_part(sample, work, ks)
            result["smallest_k_mean_cosine_0.9"] = smallest_k(result["size"], "mean_cosine")
            result["smallest_k_min_cosine_0.9"] = smallest_k(result["size"], "min_cosine")
            save()
        if "step" in parts:
            cache = store_path(work, args.step_k)
            build_cache(sample, cache, args.step_k)  # kept when the size part built it
            result["step"] = step_part(sample, cache, args.step_repeats, args.crop)
            print(result["step"], flush=True)
            save()
    result["total_minutes"] = round((time.perf_counter() - start) / 60, 2)
    result["load_average_end"] = os.getloadavg()[0]
    if "size" in result:
        print("\n| K | grid | D | codes B/sample (raw / disk) | fp16 tokens B/sample | ratio raw "
              "| ratio disk | cosine " + " / ".join(result["size"][0]["reconstruction_cosine"])
              + " (mean) |")
        print("|---:|---|---:|---|---:|---:|---:|---|")
        for r in result["size"]:
            cos = " / ".join(f"{c:.3f}" for c in r["reconstruction_cosine"].values())
            print(f"| {r['k']} | {r['grid'][0]}x{r['grid'][1]} | {r['dim']} | "
                  f"{r['codes_uint16']} / {r['codes_on_disk']:.0f} | {r['fp16_tokens']} | "
                  f"{r['ratio_raw']:g}x | {r['ratio_on_disk']:g}x | {cos} ({r['mean_cosine']}) |")
        for what in ("mean", "min"):
            k = result[f"smallest_k_{what}_cosine_0.9"]
            print(f"{what} cosine >= {COSINE_TARGET}: "
                  + (f"from K = {k}" if k else "no measured K") + f" (of {args.ks})")
    if "step" in result:
        s = result["step"]
        print(f"\nstep (K = {s['k']}, crop {s['crop']}, {s['threads']} thread(s)): "
              f"{s['base_s']} s without, {s['with_codes_s']} s with the code loss "
              f"({s['overhead_pct']:+.1f} %, goal <= 15 %), translators "
              f"{s['translator_params']} params")
    print(f"\n{result['total_minutes']} min in all, load average {result['load_average']:.1f} "
          f"at start, {result['load_average_end']:.1f} at end")
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
