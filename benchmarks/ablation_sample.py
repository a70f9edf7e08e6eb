"""Ablations of the paper's Tables 5 and 6 on the generated sample, on a CPU budget.

    python benchmarks/ablation_sample.py [--steps 350] [--root data/deliver-sample]

Trains five students with identical data, seed and schedule, and reports MSS mIoU and
the mean mIoU over the 15 system-level MISS subsets on the sample's val split:
full model; MFF without selection; mean fusion (no MFF); no L_cr; no L_se. Generates the
sample and its teacher cache first when they are missing. The whole run is meant to fit
in 15 minutes on 2 CPU cores. Prints a Markdown table, writes JSON (default
benchmarks/results/ablation_sample.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from pipeline import datasets
from pipeline.datasets.sample import SampleSpec, make_sample
from stages.student.evaluate import evaluate, flat_metrics, load_checkpoint
from stages.student.model import StudentConfig
from stages.student.train import TrainConfig, train
from stages.teacher.default_teacher import write_default_teacher
from stages.teacher.run import TeacherConfig, cache_teacher

VARIANTS = {
    "full model": ({}, {}),
    "MFF without selection": ({"select": False}, {}),
    "mean fusion (no MFF)": ({"reweight": False, "select": False}, {}),
    "no L_cr": ({}, {"w_cr": 0.0}),
    "no L_se": ({}, {"w_se": 0.0}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=350)
    parser.add_argument("--root", type=Path, default=None,
                        help="an existing sample (default: generate one in a temp folder)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/ablation_sample.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.root or tmp / "deliver-sample"
        make_sample(root, SampleSpec())
        write_default_teacher(root / "teacher")
        cache = tmp / "sample.zarr"
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                    teacher_root=str(root / "teacher")))
        val = None
        for name in args.variants.split(","):
            mff, loss = VARIANTS[name]
            student = StudentConfig(backbone="mit_b0", embed_dim=128, mff=mff)
            cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                              out=str(tmp / name.replace(" ", "_")), steps=args.steps,
                              batch_size=4, crop=128, lr=1e-3, workers=2,
                              checkpoint_every=args.steps, val_limit=8, loss=loss)
            t0 = time.perf_counter()
            summary = train(student, cfg, progress=False)
            model, meta = load_checkpoint(Path(cfg.out) / "last.pt")
            if val is None:
                val = datasets.load("sample", root, "val", modalities=meta["modalities"])
            flat = flat_metrics(evaluate(model, val, ("mss", "miss")))
            rows.append({"variant": name, "mss_mIoU": flat["mss"]["mIoU"],
                         "miss_mean_mIoU": flat["miss"]["mean_mIoU"],
                         "final_loss": round(summary["last_loss"], 3),
                         "minutes": round((time.perf_counter() - t0) / 60, 2)})
            print(rows[-1], flush=True)
    total = (time.perf_counter() - start) / 60
    print(f"\n{args.steps} steps per variant, mit_b0, batch 4 x 4 modalities, crop 128, "
          f"{os.cpu_count()} cores, {total:.1f} min in all")
    print("| variant | MSS mIoU | MISS mean mIoU | final loss | minutes |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['mss_mIoU']} | {r['miss_mean_mIoU']} | {r['final_loss']} "
              f"| {r['minutes']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "ablation_sample", "steps": args.steps,
                                    "cpu_count": os.cpu_count(), "machine": platform.machine(),
                                    "total_minutes": round(total, 2), "rows": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
