"""`pipeline ablate PLAN --dry-run`: what a real call would do, without running anything and
without needing the weights or the data: the runs it would start and the finished ones it
would reuse (after the same params check), the stages each runs, the settings every row
shares, and an estimate of the training time: steps x a step time that is yours
(--step-seconds), measured (this plan's earlier runs' logs) or declared by the plan's
recipe, always said which."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from pipeline.ablation.plan import assign
from pipeline.ablation.run import check_finished, finished_runs
from pipeline.ablation.setup import Setup
from pipeline.ablation.setup import git as _git
from stages.student.estimate import Estimate, duration, train_samples, train_steps

TOOK = re.compile(r"^ablate: (\S+) took ([0-9.]+) s \(exit 0\)$", re.M)


def _train_config(setup: Setup, overrides: dict[str, Any]) -> Any:
    from stages.student.config import TrainConfig

    merged = copy.deepcopy(setup.params)
    for key, value in overrides.items():
        assign(merged, key, value)
    return TrainConfig.from_params(merged, {}, str(setup.params_path))[1]


def measured(setup: Setup, steps: dict[str, int]) -> tuple[float, int] | None:
    """(seconds per step, runs) from this plan's finished runs logged under its log folder
    (wall time of training and evaluation over the run's steps); None when none is."""
    rates = []
    for log in sorted((setup.out / "logs").glob("*.log")):
        for name, seconds in TOOK.findall(log.read_text(errors="replace")):
            if steps.get(name):
                rates.append(float(seconds) / steps[name])
    return (sum(rates) / len(rates), len(rates)) if rates else None


def dry_run(setup: Setup, step_seconds: float | None = None, jobs: int = 1,
            echo: Any = print) -> Estimate:
    """Say what `pipeline ablate` would do; returns the estimate of one run (the
    baseline's steps)."""
    rev = _git(setup.root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip()
    setup.baseline_rev = rev
    done = finished_runs(setup.root, rev) if rev else {}
    check_finished(setup, done)  # the same refusal as a real call
    names = {setup.run_name(r, s): (r, s) for r, s in setup.runs()}
    finished = [n for n in names if n in done]
    todo = [n for n in names if n not in done]
    seeds = f"{len(setup.seeds)} seed" + "s" * (len(setup.seeds) != 1)
    pipeline = setup.dag.path.relative_to(setup.root)
    echo(f"dry run: {setup.plan.name} on {pipeline}"
         + (f" (commit {rev[:7]})" if rev else " (no commit yet: nothing finished)")
         + f": {len(setup.rows)} rows x {seeds} ({setup.plan.seed} "
         f"{', '.join(map(str, setup.seeds))}) = {len(names)} runs, {len(finished)} "
         f"finished, {len(todo)} to start")
    if setup.recipe is not None:
        echo(f"recipe for {pipeline} (the paper's setting): " + _pairs(
            setup.recipe.get("params") or {}))
    else:
        echo(f"recipe: none for {pipeline} (the plan has "
             f"{', '.join(setup.plan.recipes) or 'none'})")
    if setup.plan.every_row:
        echo("every row: " + _pairs(setup.plan.every_row))
    if setup.extra:
        echo("-S on every row: " + _pairs(setup.extra))
    lock = setup.pipeline.parent / "dvc.lock"
    frozen = setup.dag.frozen(setup.target)
    if frozen:
        where = Path(lock).relative_to(setup.root)
        echo(f"stage one ({', '.join(frozen)}): " + (
            f"recorded in {where}; checked with dvc status when ablate starts, never rerun"
            if lock.is_file() else
            f"not recorded in {where}: run `dvc repro {setup.dag.address(frozen[-1])}` "
            "first (it needs the data and the teacher weights)"))
    stages = ", ".join(setup.dag.ablated(setup.target))
    steps: dict[str, int] = {}
    first = None
    for name, (row, seed) in names.items():
        cfg = _train_config(setup, setup.overrides(row, seed))
        if first is None:
            root = Path(cfg.resolved_root())
            root = root if root.is_absolute() else setup.root / root
            declared = (setup.params.get("dataset") or {}).get("sample", {}).get("train") \
                if cfg.dataset == "sample" else None
            first = train_samples(cfg, root, declared)
        steps[name] = train_steps(cfg, first[0]) if first[0] is not None else 0
    echo(f"to start ({stages} each):" if todo else "to start: none")
    for name in todo:
        row, _ = names[name]
        echo(f"  {name}: {_pairs(setup.rows[row]) or '(baseline)'}"
             + (f", {steps[name]:,} steps" if steps[name] else ""))
    echo("finished (reused, params equal): " + (", ".join(finished) or "none"))
    n, source = first or (None, "")
    per_run = steps[next(iter(names))] or None
    if step_seconds is not None:
        estimate = Estimate(per_run, step_seconds, "declared by you (--step-seconds)")
    elif (got := measured(setup, steps)) is not None:
        estimate = Estimate(per_run, got[0], f"measured: the wall time of {got[1]} finished "
                            "run(s) of this plan (training and evaluation) over their steps")
    elif setup.recipe is not None and setup.recipe.get("step_seconds"):
        estimate = Estimate(per_run, float(setup.recipe["step_seconds"]),
                            f"declared by the plan's recipe for {pipeline} (one GPU; see "
                            "the plan file for how it was computed)")
    else:
        estimate = Estimate(per_run, None, "no step time: give --step-seconds S, or run "
                            "one seed first and the next dry run measures it")
    if per_run is None:
        echo(f"estimate: unknown steps ({source})")
    elif estimate.seconds is None:
        echo(f"estimate: {per_run:,} steps per run (train split {n}: {source}); "
             f"{estimate.basis}")
    else:
        total = estimate.seconds * len(todo)
        echo(f"estimate: {len(todo)} runs x {per_run:,} steps (train split of {n} samples, "
             f"{source}) x {estimate.step_seconds:g} s/step ({estimate.basis}) = "
             f"{duration(total)} ({duration(estimate.seconds)} per run"
             + (f"; about {duration(total / min(len(todo), jobs))} with --jobs {jobs}"
               if jobs > 1 and todo else "") + "; evaluation not included unless measured)")
    return estimate


def _pairs(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v) if isinstance(v, list | dict) else v}"
                     for k, v in overrides.items())
