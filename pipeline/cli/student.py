"""Stage two's commands: `pipeline train` and `pipeline evaluate` (both start themselves
once per rank under `--nproc N`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from any2seg.errors import PipelineError
from pipeline.cli.options import (
    ALL,
    BACKBONE,
    CONTEXT,
    DATASET,
    DEVICE,
    MISSING_MODE,
    MODE,
    PARAMS,
    PROTOCOL,
    ROOT,
    SETTING,
    LimitType,
    argv,
    debug,
    flags,
    params_root,
)
from pipeline.help_defaults import ParamsCommand, Tunable


@click.command("train", cls=ParamsCommand, context_settings=CONTEXT)
@click.option("--dataset", type=DATASET, default=None, help="Dataset.",
              cls=Tunable, key="dataset.name")
@params_root()
@click.option("--cache", default=None, help="Teacher cache.  [default: cache/DATASET.zarr]")
@click.option("--out", default=None, help="Run folder (checkpoints, dvclive).  "
              "[default: runs/DATASET]")
@click.option("--variant", type=BACKBONE, default=None,
              help="Backbone (timm:NAME: any timm model with features_only).",
              cls=Tunable, key="student.backbone")
@click.option("--pretrained", default=None, help="Local folder of pretrained MiT weights "
              "(e.g. a downloaded nvidia/mit-b2); null: random init.",
              cls=Tunable, key="student.pretrained")
@click.option("--steps", type=int, default=None, help="Optimiser steps (>= 1).",
              cls=Tunable, key="train.steps")
@click.option("--epochs", type=float, default=None, help="Epochs (> 0, instead of --steps).",
              cls=Tunable, key="train.epochs")
@click.option("--batch-size", type=int, default=None, help="Samples per step.",
              cls=Tunable, key="train.batch_size")
@click.option("--crop", type=int, default=None, help="Training crop side; any size the backbone "
              "accepts, no multiple of 32 needed.", cls=Tunable, key="train.crop")
@click.option("--lr", type=float, default=None, help="Peak learning rate.",
              cls=Tunable, key="train.lr")
@click.option("--workers", type=int, default=None, help="Data loader workers.",
              cls=Tunable, key="train.workers")
@click.option("--device", type=DEVICE, default=None, help="auto: cuda when available.",
              cls=Tunable, key="train.device")
@click.option("--seed", type=int, default=None, help="Seed.", cls=Tunable, key="train.seed")
@click.option("--nproc", type=int, default=None, help="Processes on this machine (one per "
              "GPU; gloo ranks on CPU), started through torch's elastic launcher; "
              "--batch-size is the global batch.", cls=Tunable, key="train.nproc")
@click.option("--resume", type=click.Choice(["strict", "auto"]), is_flag=False,
              flag_value="strict", default=None,
              help="Continue from OUT/last.pt. strict (the bare flag): refuse a last.pt of "
              "other settings or another teacher cache; auto (what the DVC train stage "
              "runs): continue when settings, data, teacher and code are the same, else "
              "start fresh saying what differs.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration (each value's "
              "source), the steps, checkpoints, resume decision and a time estimate; train "
              "nothing, write nothing, need no weights or data.")
@click.option("--skip-bad", is_flag=True, default=None, help="Decode every train and val "
              "sample first; log and leave out those with missing or broken files.",
              cls=Tunable, key="train.skip_bad")
@PARAMS
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
def train_cmd(dataset: str | None, root: Path | None, cache: str | None, out: str | None,
              variant: str | None, pretrained: str | None, steps: int | None,
              epochs: float | None, batch_size: int | None, crop: int | None, lr: float | None,
              workers: int | None, device: str | None, seed: int | None, nproc: int | None,
              resume: str | None, dry_run: bool, skip_bad: bool | None,
              params_path: Path | None, as_json: bool) -> None:
    """Stage two: train the Any2Seg student (shared encoder, MFF, LSCD losses) from the cache.

    Every tunable is in params.yaml under `student` and `train`; flags override them.
    Several GPUs: `--nproc N`, or `torchrun --nproc-per-node N -m pipeline train ...`.
    """
    from any2seg.config import read_params
    from any2seg.devices import resolve_device
    from stages.student import distributed
    from stages.student.config import TrainConfig
    from stages.student.train import train

    params, source = read_params(params_path)
    if steps is not None and epochs is not None:
        raise PipelineError("--steps and --epochs are both given; give one: --steps counts "
                            "optimiser steps, --epochs passes over the train split")
    overrides = {"dataset": dataset, "root": str(root) if root else None, "cache": cache,
                 "out": out, "backbone": variant, "pretrained": pretrained, "steps": steps,
                 "epochs": epochs, "batch_size": batch_size, "crop": crop, "lr": lr,
                 "workers": workers, "device": device, "seed": seed, "nproc": nproc,
                 "skip_bad": skip_bad}
    if steps is not None:
        overrides["epochs"] = None
    named = flags(overrides, {"backbone": "--variant"})
    student, cfg = TrainConfig.from_params(params, overrides, source, named)
    if steps is not None:
        cfg.epochs = None
    if epochs is not None and steps is None:
        cfg.steps = None
    if dry_run:
        from stages.student.dry_run import describe

        click.echo(describe(student, cfg, params, source, named, resume))
        return
    if cfg.nproc > 1 and not distributed.launched():
        distributed.World(size=cfg.nproc).split(cfg.batch_size)  # refused before any start
        distributed.launch(cfg.nproc, argv(), resolve_device(cfg.device), debug())
        return  # rank 0 printed the summary
    try:
        summary = train(student, cfg, progress=True, resume=resume or False)
    finally:
        distributed.leave()
    if os.environ.get("RANK", "0") != "0":
        return
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    elif summary["status"] == "finished" and resume == "auto":
        click.echo(f"{summary['out']} has finished this run (same settings, data, teacher "
                   f"and code): its last.pt is at step {summary['start']} of "
                   f"{summary['steps']}; nothing to do")
    elif summary["status"] == "finished":
        click.echo(f"{summary['out']} has finished: its last.pt is at step {summary['start']} "
                   f"of {summary['steps']}; nothing to resume (evaluate "
                   f"{summary['out']}/best.pt, or train more steps into a new --out)")
    else:
        bad = summary.get("skipped_bad")
        skipped = f"; {bad} samples skipped as bad (--skip-bad)" if bad else ""
        resumed = f" (resumed at step {summary['start']})" if summary["start"] else ""
        click.echo(f"trained {summary['steps']} steps{resumed} into {summary['out']} in "
                   f"{summary['seconds']} s: loss {summary['first_loss']:.3f} -> "
                   f"{summary['last_loss']:.3f}, val mIoU {summary['val_mIoU']}{skipped}")


@click.command("evaluate", cls=ParamsCommand, context_settings=CONTEXT)
@click.option("--checkpoint", type=click.Path(path_type=Path), required=True,
              help="A student checkpoint, e.g. runs/sample/best.pt.")
@click.option("--dataset", type=DATASET, default=None, help="Dataset.  [default: the "
              "checkpoint's]")
@ROOT
@click.option("--split", default=None, help="Split to evaluate.", cls=Tunable, key="eval.split")
@click.option("--setting", type=SETTING, default=None,
              help="MSS (all modalities), MISS (every modality subset), sensor (per weather "
              "and failure case), or all.", cls=Tunable, key="eval.setting")
@click.option("--mode", type=MODE, default=None,
              help="Whole-image or sliding-window inference.", cls=Tunable, key="eval.mode")
@click.option("--crop", type=int, default=None, help="Sliding-window size.",
              cls=Tunable, key="eval.crop")
@click.option("--stride", type=int, default=None, help="Sliding-window stride.",
              cls=Tunable, key="eval.stride")
@click.option("--protocol", type=PROTOCOL, default=None,
              help="official: resize and score as the dataset's official evaluation code "
              "(DELIVER: 1024 short side); native: as stored; null: official for deliver "
              "and mcubes, native for sample.", cls=Tunable, key="eval.protocol")
@click.option("--missing", type=MISSING_MODE, default=None,
              help="Absent modalities: black frames (MISS), zeros after normalisation, or "
              "left out of the fusion; null: black under --protocol official, else the "
              "checkpoint's.", cls=Tunable, key="eval.missing")
@click.option("--limit", type=LimitType(), default=None, help="Evaluate only the first N (>= 1) "
              "samples; all: every sample, whatever eval.limit says.", cls=Tunable,
              key="eval.limit")
@click.option("--examples", type=int, default=None,
              help="Samples drawn in predictions.png.", cls=Tunable, key="eval.examples")
@click.option("--device", type=DEVICE, default="auto", help="auto: cuda when available.")
@click.option("--nproc", type=int, default=None, help="Processes on this machine, each "
              "scoring a share of the samples (one per GPU).", cls=Tunable, key="eval.nproc")
@click.option("--out", type=click.Path(path_type=Path), default=Path("metrics"),
              help="Folder for report.md, *.json and plots/.")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
              help="Parameters file (its `eval` group).  [default: ./params.yaml if present]")
def evaluate_cmd(checkpoint: Path, dataset: str | None, root: Path | None, split: str | None,
                 setting: str | None, protocol: str | None, mode: str | None,
                 crop: int | None, stride: int | None, missing: str | None,
                 limit: int | str | None, examples: int | None, device: str,
                 nproc: int | None, out: Path,
                 params_path: Path | None) -> None:
    """Evaluate a student: mIoU, mAcc, F1 and pixel accuracy per setting, with charts.

    Several processes (`--nproc N` or torchrun) score shares of the samples; the
    confusion matrices are summed, so the numbers equal those of one process."""
    from any2seg.config import read_params
    from any2seg.devices import resolve_device
    from stages.student import distributed
    from stages.student.eval_config import EvalConfig
    from stages.student.evaluate import describe, flat_metrics, markdown
    from stages.student.evaluate_run import evaluate_checkpoint

    params, source = read_params(params_path)
    overrides = {"split": split, "setting": setting, "protocol": protocol, "mode": mode,
                 "crop": crop, "stride": stride, "missing": missing,
                 "limit": None if limit == ALL else limit, "examples": examples,
                 "nproc": nproc}
    cfg, where = EvalConfig.from_params(params, overrides, source, flags(overrides))
    if limit == ALL:  # every sample, whatever eval.limit says
        cfg.limit = None
    if cfg.nproc > 1 and not distributed.launched():
        distributed.launch(cfg.nproc, argv(), resolve_device(device), debug())
        return  # rank 0 wrote and printed the results
    try:
        world = distributed.join(resolve_device(device))
        done = evaluate_checkpoint(world, cfg, where, checkpoint, dataset, root, out)
        if done is not None:  # the main rank: print what it wrote
            result, written = done
            click.echo(describe(result) + "\n")
            click.echo(markdown(flat_metrics(result)))
            click.echo("wrote " + ", ".join(str(p) for p in written))
    finally:
        distributed.leave()
