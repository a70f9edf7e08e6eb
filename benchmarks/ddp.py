"""Data-parallel training on CPU: 1 vs 2 gloo ranks, steps/s, samples/s, communication.

    python benchmarks/ddp.py [--steps 8] [--repeats 3] [--crop 128] [--batch-size 4]

Each world size runs the training step of `stages.student.train` (keyed noise, the
losses over the global batch through `World.total`, `(loss * ranks).backward()`, AdamW)
on the same global batches, one process per rank, the cores split between the ranks.
The communication share is 1 - (step time without the gradient all-reduce, DDP's
`no_sync`) / (step time with it); the all-reduce of a gradient-sized buffer alone is
timed too. Prints a Markdown table, writes JSON (default benchmarks/results/ddp.json).
Three layouts: 1 rank on 1 core, 1 rank on all cores, 2 ranks sharing the cores. On 2
cores the gain from a second rank is small: the point is what the all-reduce costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, size: int, threads: int, port: int, args: dict[str, Any],
          out: str) -> None:
    import torch.distributed as dist

    from any2seg import datasets
    from any2seg.precision import upcast
    from stages.student import distributed, noise
    from stages.student.config import TrainConfig
    from stages.student.data import ScheduleSampler, StudentData
    from stages.student.losses import LossConfig, correlation, semantic, supervised
    from stages.student.model import StudentConfig, build_student
    from stages.student.train import load_targets, open_targets

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(size))
    torch.set_num_threads(threads)
    world = distributed.join("cpu")
    cfg = TrainConfig(dataset="sample", root=args["root"], cache=args["cache"],
                      steps=args["warmup"] + args["steps"], batch_size=args["batch_size"],
                      crop=args["crop"], workers=0, seed=args["seed"], modality_dropout=0.5)
    cache = open_targets(cfg.resolved_cache(), cfg)
    modalities = list(cache.modalities)
    train_set = datasets.load("sample", args["root"], "train", modalities=modalities)
    targets = load_targets(cache, train_set, modalities, cfg)
    data = StudentData(train_set, modalities, targets, cfg.crop, cfg.augment_config(),
                       cfg.seed, cfg.modality_dropout)
    local = world.split(cfg.batch_size)
    batches = [torch.utils.data.default_collate([data[k] for k in keys]) for keys in
               ScheduleSampler(len(data), cfg.batch_size, cfg.steps, cfg.seed, 0, rank, size)]
    torch.manual_seed(cfg.seed)
    model = build_student(StudentConfig(backbone=args["backbone"]), modalities,
                          len(train_set.classes))
    net = distributed.parallel(model, world)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    classes = torch.from_numpy(targets.classes)
    loss_cfg = LossConfig()
    model.train()
    times: dict[str, list[float]] = {"sync": [], "no_sync": []}
    for mode in ("sync", "no_sync") if size > 1 else ("sync",):
        for step, batch in enumerate(batches):
            world.barrier()
            t0 = time.perf_counter()
            slots = rank * local + torch.arange(local)
            skip = net.no_sync() if mode == "no_sync" else contextlib.nullcontext()
            with skip, noise.using(noise.sample_keys(cfg.seed, step, slots)):
                output = net(batch["images"], batch["present"])
                fused = upcast(output.fused[-1].fused)
                loss = supervised(upcast(output.logits), batch["label"], loss_cfg, world.total)
                loss = loss + correlation(upcast(output.feats[-1]), fused, output.present,
                                          batch["visual"], batch["scene"], loss_cfg.tau_cr,
                                          world.total)
                loss = loss + semantic(fused, batch["label"], classes, loss_cfg.tau_se,
                                       world.total)
                optimizer.zero_grad(set_to_none=True)
                (loss * size).backward()
            optimizer.step()
            loss.item()
            if step >= args["warmup"]:
                times[mode].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    allreduce: list[float] = []
    if size > 1:
        buffer = torch.zeros(n_params)
        for _ in range(args["steps"]):
            world.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(buffer)
            allreduce.append(time.perf_counter() - t0)
    if world.main:
        Path(out).write_text(json.dumps({"times": times, "allreduce": allreduce,
                                         "params": n_params}))
    world.barrier()
    distributed.leave()


def run(size: int, threads: int, args: dict[str, Any]) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    mp.spawn(_rank, args=(size, threads, _free_port(), args, out), nprocs=size, join=True)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--backbone", default="mit_b0")
    parser.add_argument("--root", type=Path, default=None, help="an existing sample")
    parser.add_argument("--cache", type=Path, default=None, help="its teacher cache")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ddp.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        root, cache = args.root, args.cache
        if root is None or cache is None:
            from any2seg.synth import SampleSpec, make_sample
            from stages.teacher.default.folders import write_default_teacher
            from stages.teacher.run import TeacherConfig, cache_teacher

            root, cache = Path(tmp_name) / "deliver-sample", Path(tmp_name) / "sample.zarr"
            make_sample(root, SampleSpec(size=128, train=24, val=4, test=4), workers=1)
            write_default_teacher(root / "teacher")
            cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                        teacher_root=str(root / "teacher"), split=["train"]))
        shared = {"root": str(root), "cache": str(cache), "steps": args.steps,
                  "warmup": args.warmup, "batch_size": args.batch_size, "crop": args.crop,
                  "backbone": args.backbone, "seed": 0, "cores": os.cpu_count() or 1}
        rows = []
        cores = shared["cores"]
        # one rank on one core, one rank on all cores, the cores split over 2 ranks
        layouts = list(dict.fromkeys([(1, 1), (1, cores), (2, max(1, cores // 2))]))
        for size, threads in layouts:
            per_repeat = [run(size, threads, {**shared, "seed": seed})
                          for seed in range(args.repeats)]
            step = [statistics.median(r["times"]["sync"]) for r in per_repeat]
            row: dict[str, Any] = {"ranks": size, "threads_per_rank": threads,
                                   "local_batch": args.batch_size // size}
            row["step_s"] = _mean_std(step)
            row["steps_per_s"] = _mean_std([1 / s for s in step])
            row["samples_per_s"] = _mean_std([args.batch_size / s for s in step])
            if size > 1:
                quiet = [statistics.median(r["times"]["no_sync"]) for r in per_repeat]
                row["step_no_sync_s"] = _mean_std(quiet)
                row["comm_share"] = _mean_std([1 - q / s for q, s in zip(quiet, step,
                                                                         strict=True)])
                row["grad_allreduce_s"] = _mean_std([statistics.median(r["allreduce"])
                                                     for r in per_repeat])
            row["params"] = per_repeat[0]["params"]
            rows.append(row)
    print(f"| ranks | threads/rank | step s | steps/s | samples/s | comm share | "
          f"all-reduce of {rows[0]['params'] / 1e6:.2f} M grads s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        comm = f"{r['comm_share'][0]:.1%} ± {r['comm_share'][1]:.1%}" if "comm_share" in r \
            else "-"
        red = f"{r['grad_allreduce_s'][0]:.4f} ± {r['grad_allreduce_s'][1]:.4f}" \
            if "grad_allreduce_s" in r else "-"
        print(f"| {r['ranks']} | {r['threads_per_rank']} | {r['step_s'][0]:.3f} ± "
              f"{r['step_s'][1]:.3f} | {r['steps_per_s'][0]:.2f} | "
              f"{r['samples_per_s'][0]:.2f} ± {r['samples_per_s'][1]:.2f} | {comm} | {red} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "ddp", "backend": "gloo (CPU)", "backbone": args.backbone,
        "crop": args.crop, "global_batch": args.batch_size, "timed_steps": args.steps,
        "repeats (seeds)": args.repeats, "cpu_count": shared["cores"],
        "machine": platform.platform(), "torch": torch.__version__,
        "note": "wall-clock on a shared machine under load from other jobs; mean ± std over "
                "repeats of the median step",
        "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
