"""`pipeline ablate PLAN`: an ablation plan run as rows x seeds of DVC experiments, and its
report (the work is in pipeline.ablation.run and pipeline.ablation.report)."""

from __future__ import annotations

from pathlib import Path

import click

from any2seg.errors import PipelineError
from pipeline.cli.options import CONTEXT


@click.command("ablate", context_settings=CONTEXT)
@click.argument("plan")
@click.option("--seeds", type=int, default=3, help="Seeds per row (train.seed, train.seed + 1, "
              "...); the same seed gives every row the same initial weights and batches.")
@click.option("--rows", default=None, help="Comma-separated rows to run (the baseline always "
              "runs).  [default: every row of the plan]")
@click.option("-S", "--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="A params.yaml override added to every row (repeatable), as dvc exp run -S; "
              "it wins over the plan's every_row and recipe. -S train.seed=N (the plan's "
              "seed key) sets the first seed: the seeds are N, N+1, ...")
@click.option("--jobs", type=int, default=1, help="Runs at once (one GPU each when there are "
              "GPUs, through CUDA_VISIBLE_DEVICES).")
@click.option("--metric", "metrics", multiple=True, metavar="FILE.KEY",
              help="Another metric to report, FILE.KEY of a metrics file the plan's "
              "target stage writes, e.g. mss.mAcc (besides the plan's metrics; by default "
              "mss.mIoU, miss.mean_mIoU and sensor.mean_of_groups_mIoU).")
@click.option("--pipeline", "pipeline_path", type=click.Path(path_type=Path), default=None,
              help="The dvc.yaml to run.  [default: ./dvc.yaml]")
@click.option("--report", "report_only", is_flag=True,
              help="Only re-render the report from the finished runs (no training).")
@click.option("--dry-run", is_flag=True,
              help="Say what would run (runs to start, finished ones, stages, the recipe) and "
              "estimate the training time; runs nothing, needs neither weights nor data.")
@click.option("--step-seconds", type=float, default=None, metavar="S",
              help="Seconds per training step for --dry-run's estimate (yours, e.g. from "
              "benchmarks/gpu_check.py).  [default: measured from this plan's finished "
              "runs, else the plan's declared figure]")
def ablate_cmd(plan: str, seeds: int, rows: str | None, sets: tuple[str, ...], jobs: int,
               metrics: tuple[str, ...], pipeline_path: Path | None, report_only: bool,
               dry_run: bool, step_seconds: float | None) -> None:
    """Run an ablation plan (configs/ablations/PLAN.yaml) as rows x seeds of DVC experiments.

    Each run is `dvc exp run --temp --name PLAN-ROW-sSEED` of the plan's target stage
    (evaluate unless the plan names another) on the one cached teacher (stage one never
    reruns; the workspace's runs/ and metrics/ are untouched). A pipeline that reads data
    DVC does not hold (data/DELIVER, weights/, or folders outside the repository) runs in
    linked workspaces under .dvc/tmp/ablate instead of --temp copies (the data linked and
    read in place, hashed once per workspace). A rerun starts only the
    missing runs and removes what killed ones left; a finished run is reused only when
    every param it recorded equals what this command would run (else it is refused).
    --dry-run says what would run and estimates the time. Writes ablations/PLAN/report.md,
    report.json and plot.png: mean ± std over seeds, the paired difference to the baseline
    with its 95 % t interval and verdict.
    """
    from pipeline.ablation import run as ablate
    from pipeline.ablation.setup import prepare

    setup = prepare(plan, seeds, rows, sets, metrics, pipeline_path)
    if dry_run:
        from pipeline.ablation.dryrun import dry_run as say

        if step_seconds is not None and not step_seconds > 0:
            raise PipelineError(f"--step-seconds must be > 0, got {step_seconds:g}")
        say(setup, step_seconds, jobs, echo=click.echo)
        return
    if not report_only:
        ablate.check_stage_one(setup)
        ablate.ablate(setup, jobs, echo=click.echo)
    from pipeline.ablation import report as ablation_report

    written = ablation_report.report(setup)
    click.echo(written[0].read_text())
    click.echo("wrote " + ", ".join(str(p) for p in written))
