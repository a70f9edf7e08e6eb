"""CodeAlign on the generated sample: two groups that never share a frame, three seeds.

    python benchmarks/codealign.py [--seeds 0,1,2] [--size 64] [--stage0 100]
                                   [--stage1 40] [--stage2 40] [--out FILE]

Per seed (the scene -> group split and every initialisation / batch order change with it):
stages 0, 1, 2 of `pipeline codealign` with params.yaml's `codealign` (groups
[[rgb, depth], [event, lidar]]) and `student`, step budgets from the flags, then the
evaluation table on val: source modality -> translator -> target back-end ("translated"),
the target group's own modalities fused with the translation ("fused", the official
collaboration), the target group's own model on its own modalities, the source group's
own model on the source modality alone, and naive joint training on the same split fed
the source modality alone. Reports mean +- std over seeds per translator, and whether the
gap of the translation and of the fused row to each reference exceeds twice the larger
seed spread (else: inside the noise). Writes benchmarks/results/codealign.json. CPU, one
thread per process (tiny models: more threads only contend on shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import torch

from any2seg.config import Where, build, load_params
from any2seg.synth import SampleSpec, make_sample
from stages.student.codealign.config import CodeAlignConfig
from stages.student.codealign.evaluate import KINDS, evaluate_run
from stages.student.codealign.stages import CodeAlignRun
from stages.student.model import StudentConfig

COMPARED = ("translated", "fused")
REFERENCES = ("target own", "source own", "naive joint")



def one_seed(root: Path, work: Path, student: StudentConfig, cfg: CodeAlignConfig,
             seed: int) -> tuple[list[dict[str, Any]], float]:
    t0 = time.perf_counter()
    cfg = replace(cfg, seed=seed, train_seed=cfg.train_seed + seed)
    run = CodeAlignRun("sample", root, work / f"seed{seed}", student, cfg)
    run.stage0()
    run.stage1()
    run.stage2()
    return evaluate_run(run, "stage2", "val"), time.perf_counter() - t0


def summarise(per_seed: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for i, first in enumerate(per_seed[0]):
        row: dict[str, Any] = {"pair": first["pair"]}
        for kind in KINDS:
            values = [rows[i][kind] for rows in per_seed]
            row[kind] = {"mean": round(mean(values), 2), "std": round(pstdev(values), 2),
                         "seeds": values}
        for kind in COMPARED:
            for ref in REFERENCES:
                gap = row[kind]["mean"] - row[ref]["mean"]
                spread = max(row[kind]["std"], row[ref]["std"])
                row[f"{kind} vs {ref}"] = {"gap": round(gap, 2),
                                           "beyond_noise": abs(gap) > 2 * spread}
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--size", type=int, default=64, help="Sample image side.")
    parser.add_argument("--stage0", type=int, default=100)
    parser.add_argument("--stage1", type=int, default=40)
    parser.add_argument("--stage2", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codealign.json"))
    parser.add_argument("--merge", default=None, metavar="FILE,FILE",
                        help="Combine the JSON of single-seed runs (run in parallel) into one "
                        "table instead of training.")
    args = parser.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge.split(",")]
        first = parts[0]
        for part in parts[1:]:
            for key in ("size", "codealign", "student"):
                if part[key] != first[key]:
                    parser.error(f"--merge: {key} differs between the files")
        cfg = CodeAlignConfig(**first["codealign"])
        student = StudentConfig(**first["student"])
        spec = SampleSpec(size=first["size"])
        report([r for part in parts for r in part["per_seed"]],
               [s for part in parts for s in part["seeds"]],
               [t for part in parts for t in part["seconds_per_seed"]], cfg, student,
               spec, args.out)
        return
    torch.set_num_threads(1)
    params = load_params()
    student = build(StudentConfig, dict(params.get("student") or {}), Where("student"))
    cfg = build(CodeAlignConfig, dict(params.get("codealign") or {}), Where("codealign"))
    cfg = replace(cfg, stage0_steps=args.stage0, stage1_steps=args.stage1,
                  stage2_steps=args.stage2, crop=min(cfg.crop, args.size),
                  checkpoint_every=10_000)
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "deliver-sample"
        spec = SampleSpec(size=args.size)
        make_sample(root, spec, workers=1)
        per_seed, times = [], []
        for seed in seeds:
            rows, seconds = one_seed(root, Path(tmp), student, cfg, seed)
            per_seed.append(rows)
            times.append(seconds)
            print(f"seed {seed}: {seconds:.0f} s", flush=True)
    report(per_seed, seeds, times, cfg, student, spec, args.out)


def report(per_seed: list[list[dict[str, Any]]], seeds: list[int], times: list[float],
           cfg: CodeAlignConfig, student: StudentConfig, spec: SampleSpec, out: Path) -> None:
    table = summarise(per_seed)
    print(f"\nCodeAlign on the sample ({spec.size} px, {spec.train} train / {spec.val} val "
          f"frames), groups {cfg.groups}, K = {cfg.codes}, steps {cfg.stage0_steps}/"
          f"{cfg.stage1_steps}/{cfg.stage2_steps}, mIoU on val, mean +- std over seeds "
          f"{seeds}\n")
    print("| source -> target group | " + " | ".join(KINDS) + " |")
    print("|---" * (len(KINDS) + 1) + "|")
    for r in table:
        cells = [f"{r[k]['mean']:.2f} +- {r[k]['std']:.2f}" for k in KINDS]
        print(f"| {r['pair']} | " + " | ".join(cells) + " |")
    gaps = [f"{k} vs {ref}" for k in COMPARED for ref in REFERENCES]
    print("\n| source -> target group | " + " | ".join(gaps) + " |")
    print("|---" * (len(gaps) + 1) + "|")
    for r in table:
        cells = [f"{r[g]['gap']:+.2f}" + ("" if r[g]["beyond_noise"] else " (noise)")
                 for g in gaps]
        print(f"| {r['pair']} | " + " | ".join(cells) + " |")
    pay = per_seed[0][0]
    print(f"\npayload: {pay['code_bits_per_pixel']:.4f} bits per input pixel of codes "
          f"(sum_s log2 K / stride_s^2) vs {pay['float_bits_per_pixel']:.1f} of float32 "
          f"features (sum_s 32 C_s / stride_s^2): {pay['ratio']:.0f}x")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "codealign", "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "torch_threads": 1, "size": spec.size, "train": spec.train, "val": spec.val,
        "seeds": seeds, "seconds_per_seed": [round(t, 1) for t in times],
        "codealign": vars(cfg), "student": vars(student),
        "payload": {k: pay[k] for k in ("code_bits_per_pixel", "float_bits_per_pixel",
                                        "ratio")},
        "table": table, "per_seed": per_seed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
