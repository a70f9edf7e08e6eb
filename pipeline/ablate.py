"""`pipeline ablate`: a plan's rows x seeds as DVC experiments on the one cached teacher.

Each run is `dvc exp run --temp --name <plan>-<row>-s<seed> -S ...`: DVC runs it in a
temporary copy of the workspace, so the workspace's own `runs/` and `metrics/` are never
touched, and the result is an ordinary experiment (`dvc exp show`, `dvc exp apply NAME`
restores it, `dvc exp run` reproduces it). Stage one is checked once up front (`dvc status`
of every stage before `train` must be clean, and no row may change a key those stages read),
so in every run DVC skips it. Finished runs are the experiment refs of the current commit:
a killed ablate, rerun, starts only the runs that are missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.ablation_plan import (
    STUDENT_STAGES,
    Plan,
    assign,
    check_rows,
    load_plan,
    lookup,
    stage_params,
)
from pipeline.errors import PipelineError

HEADLINE = {"mss": "mIoU", "miss": "mean_mIoU", "sensor": "mean_of_groups_mIoU"}


@dataclass
class Setup:
    """Everything a run and the report need, resolved once."""

    plan: Plan
    root: Path  # the git / DVC repository
    pipeline: Path  # dvc.yaml
    params_path: Path
    params: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # row -> its own overrides (baseline first)
    seeds: list[int]
    metrics: list[tuple[str, str]]  # (file stem, key)
    metric_files: dict[str, str]  # stem -> path relative to the repository root
    baseline_rev: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def run_name(self, row: str, seed: int) -> str:
        return f"{self.plan.name}-{row}-s{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """(row, seed) in seed-major order: the first runs give every row one seed."""
        return [(row, seed) for seed in self.seeds for row in self.rows]

    def overrides(self, row: str, seed: int) -> dict[str, Any]:
        """What the run sets: the -S overrides, the row's own and its seed."""
        return {**self.extra, **self.rows[row], "train.seed": seed}

    @property
    def out(self) -> Path:
        return self.root / "ablations" / self.plan.name


def _git(root: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed in {root}: "
                            f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return result.stdout


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_dvc_bin(), *args], cwd=root, capture_output=True, text=True)


def _dvc_bin() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else "dvc"


def parse_set(values: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`-S key=value` pairs; values are YAML, as DVC reads them."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"-S expects KEY=VALUE (a dotted params.yaml key), got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def prepare(plan_name: str, seeds: int, rows: str | None, sets: list[str] | tuple[str, ...],
            metrics: list[str] | tuple[str, ...], pipeline: Path | None) -> Setup:
    """Load and check the plan against the pipeline and its params (no DVC call yet)."""
    if seeds < 1:
        raise PipelineError(f"--seeds must be an integer >= 1 (seeds per row), got {seeds}")
    plan = load_plan(plan_name)
    dvc_yaml = (pipeline or Path("dvc.yaml")).resolve()
    if not dvc_yaml.is_file():
        raise PipelineError(f"--pipeline: {dvc_yaml} does not exist; run ablate in the "
                            "project (the folder with dvc.yaml) or name its dvc.yaml")
    top = _git(dvc_yaml.parent, "rev-parse", "--show-toplevel", check=False).strip()
    if not top:
        raise PipelineError(f"{dvc_yaml.parent} is not in a git repository; ablate records "
                            "runs as DVC experiments of a commit (git init, git add -A, "
                            "git commit)")
    root = Path(top)
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    missing = [s for s in STUDENT_STAGES if s not in (spec.get("stages") or {})]
    if missing:
        raise PipelineError(f"{dvc_yaml} has no stage {missing[0]!r}; ablate runs the "
                            f"{' and '.join(STUDENT_STAGES)} stages")
    params_path = dvc_yaml.parent / "params.yaml"
    from pipeline.config import load_params

    params = load_params(params_path)
    rel_params = os.path.relpath(params_path, Path.cwd())
    extra = parse_set(sets)
    selected = [r.strip() for r in rows.split(",") if r.strip()] if rows else []
    checked = check_rows(plan, selected, extra, params, stage_params(spec), rel_params)
    _check_values({r: {**extra, **o} for r, o in checked.items()}, params, rel_params)
    wanted = list(HEADLINE.items())
    for name in metrics:
        stem, dot, key = name.partition(".")
        if not dot or not key:
            raise PipelineError(f"--metric expects FILE.KEY as in metrics/FILE.json, e.g. "
                                f"mss.mAcc or miss.rgb-depth, got {name!r}")
        if (stem, key) not in wanted:
            wanted.append((stem, key))
    files = {}
    for entry in (spec["stages"]["evaluate"] or {}).get("metrics") or []:
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        files[Path(path).stem] = os.path.relpath(dvc_yaml.parent / path, root)
    unknown = [s for s, _ in wanted if s not in files]
    if unknown:
        raise PipelineError(f"--metric {unknown[0]}.*: the evaluate stage of {dvc_yaml} "
                            f"writes no {unknown[0]}.json (it writes {', '.join(files)})")
    base_seed = extra.get("train.seed", lookup(params, "train.seed")[1])
    if not isinstance(base_seed, int) or isinstance(base_seed, bool):
        raise PipelineError(f"{rel_params}: train.seed must be an integer, got {base_seed!r}")
    extra.pop("train.seed", None)
    return Setup(plan, root, dvc_yaml, params_path, params, checked,
                 [base_seed + i for i in range(seeds)], wanted, files, extra=extra)


def _check_values(rows: dict[str, dict[str, Any]], params: dict[str, Any], source: str) -> None:
    """Every row's values in range, by building the configs the stages build."""
    import copy

    from pipeline.config import Where, build
    from stages.student.evaluate import EvalConfig
    from stages.student.train import TrainConfig

    for row, overrides in rows.items():
        merged = copy.deepcopy(params)
        for key, value in overrides.items():
            assign(merged, key, value)
        try:
            TrainConfig.from_params(merged, {}, source)
            cfg = build(EvalConfig, dict(merged.get("eval") or {}), Where("eval", source))
            cfg.validate(Where("eval", source))
        except PipelineError as exc:
            raise PipelineError(f"row {row!r}: {exc}") from exc


def _rel(setup: Setup, path: Path) -> str:
    return os.path.relpath(path, setup.root)


def check_stage_one(setup: Setup) -> dict[str, Any]:
    """The pipeline up to the teacher cache is recorded in dvc.lock and up to date; returns
    the cache's fingerprints (read once, named in the report)."""
    lock = setup.pipeline.parent / "dvc.lock"
    if not lock.is_file():
        raise PipelineError(f"ablate needs the teacher cache recorded in {_rel(setup, lock)}: "
                            "run `dvc repro` once (committing dvc.lock is optional)")
    stages = yaml.safe_load(setup.pipeline.read_text())["stages"]
    # the stages before train (dvc.yaml lists a pipeline in order): stage one and what
    # feeds it; later stages (evaluate, the CodeAlign chain) are not ablate's concern
    names = list(stages)
    upstream = names[:names.index("train")]
    prefix = "" if setup.pipeline.parent == setup.root else f"{_rel(setup, setup.pipeline)}:"
    result = _dvc(setup.root, "status", "--json", *[prefix + s for s in upstream])
    if result.returncode != 0:
        raise PipelineError(f"dvc status failed: {_last_line(result.stderr or result.stdout)}")
    changed = json.loads(result.stdout or "{}")
    if changed:
        raise PipelineError(f"the teacher cache is not up to date with {_rel(setup, lock)} "
                            f"(dvc status: {', '.join(changed)} changed); run `dvc repro "
                            f"{prefix}{upstream[-1]}` first, then ablate")
    return teacher_info(setup)


def teacher_info(setup: Setup) -> dict[str, Any]:
    """The teacher cache's fingerprints, as the report names them."""
    from pipeline.store import open_cache

    dataset = lookup(setup.params, "dataset.name")[1] or "sample"
    cache = open_cache(setup.pipeline.parent / "cache" / f"{dataset}.zarr")
    fingerprint = cache.teacher_fingerprint
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return {"store": _rel(setup, cache.path), "teacher_fingerprint_sha256": digest,
            "teacher_fingerprint": fingerprint,
            "dataset_fingerprint": cache.dataset_fingerprint}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def baseline_rev(root: Path) -> str:
    rev = _git(root, "rev-parse", "--verify", "-q", "HEAD^{commit}", check=False).strip()
    if not rev:
        raise PipelineError(f"{root} has no commit; ablate records runs as DVC experiments of "
                            "a commit: git add -A && git commit first")
    return rev


def finished_runs(root: Path, rev: str) -> dict[str, str]:
    """{experiment name: its commit} of the experiments DVC recorded on commit `rev`."""
    out = _git(root, "for-each-ref", "--format=%(refname) %(objectname)",
               f"refs/exps/{rev[:2]}/{rev[2:]}/")
    found = {}
    for line in out.splitlines():
        ref, _, commit = line.partition(" ")
        found[ref.rsplit("/", 1)[-1]] = commit
    return found


def run_params(setup: Setup, commit: str) -> dict[str, Any]:
    rel = _rel(setup, setup.params_path)
    return yaml.safe_load(_git(setup.root, "show", f"{commit}:{rel}")) or {}


def check_finished(setup: Setup, name: str, commit: str, row: str, seed: int) -> None:
    """A finished run of that name must have the params this row asks for."""
    recorded = run_params(setup, commit)
    for key, value in setup.overrides(row, seed).items():
        found, have = lookup(recorded, key)
        if not found or have != value:
            raise PipelineError(f"experiment {name!r} exists with {key}={have!r}, the plan "
                                f"asks for {value!r}; remove it (`dvc exp remove {name}`) or "
                                "commit first (experiments belong to a commit)")


def _gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no torch CUDA: CPU runs
        return []


def _set_args(setup: Setup, overrides: dict[str, Any]) -> list[str]:
    prefix = "" if setup.pipeline.parent == setup.root else f"{_rel(setup, setup.params_path)}:"
    args = []
    for key, value in overrides.items():
        args += ["-S", f"{prefix}{key}={json.dumps(value)}"]
    return args


def run_one(setup: Setup, row: str, seed: int, gpu: str | None, log_dir: Path) -> str:
    """One `dvc exp run --temp`; returns the experiment name. Its output goes to a log."""
    name = setup.run_name(row, seed)
    lock = setup.pipeline.parent / "dvc.lock"
    cmd = [_dvc_bin(), "--wait-for-lock", "exp", "run", "--temp", "--name", name]
    if _git(setup.root, "ls-files", _rel(setup, lock)).strip() == "":
        cmd += ["-C", _rel(setup, lock)]  # untracked: copy the record of stage one in
    cmd += _set_args(setup, setup.overrides(row, seed))
    # the target is evaluate (and what it needs): other stages of the pipeline, such as the
    # CodeAlign chain of the root dvc.yaml, are not part of an ablation row
    if setup.pipeline.parent != setup.root:
        cmd.append(f"{_rel(setup, setup.pipeline)}:evaluate")
    else:
        cmd.append("evaluate")
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    log = log_dir / f"{name}.log"
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.run(cmd, cwd=setup.root, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    text = log.read_text()
    if code != 0:
        raise PipelineError(f"run {name} failed ({_last_line(text)}); full log: {log}")
    stages = yaml.safe_load(setup.pipeline.read_text())["stages"]
    reran = [s for s in stages if s not in STUDENT_STAGES and f"Running stage '{s}'" in text]
    if reran:  # the up-front check makes this impossible; say so loudly if it happens
        raise PipelineError(f"run {name} reran {reran[0]} (stage one must not rerun); "
                            f"log: {log}")
    return name


def ablate(setup: Setup, jobs: int = 1, echo: Any = print) -> dict[str, str]:
    """Run every missing (row, seed) and return {name: commit} of all of them."""
    if jobs < 1:
        raise PipelineError(f"--jobs must be an integer >= 1, got {jobs}")
    setup.baseline_rev = baseline_rev(setup.root)
    done = finished_runs(setup.root, setup.baseline_rev)
    todo = []
    for row, seed in setup.runs():
        name = setup.run_name(row, seed)
        if name in done:
            check_finished(setup, name, done[name], row, seed)
        else:
            todo.append((row, seed))
    total = len(setup.runs())
    echo(f"{setup.plan.name}: {len(setup.rows)} rows x {len(setup.seeds)} seeds = {total} "
         f"runs, {total - len(todo)} finished, {len(todo)} to run on commit "
         f"{setup.baseline_rev[:7]}")
    if todo:
        log_dir = setup.out / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        gpus = _gpus() if jobs > 1 else []
        slots = list(range(jobs))

        def work(item: tuple[str, int]) -> str:
            slot = slots.pop()
            try:
                gpu = gpus[slot % len(gpus)] if gpus else None
                return run_one(setup, *item, gpu, log_dir)
            finally:
                slots.append(slot)

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(work, item) for item in todo]
            for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
                echo(f"finished {future.result()} ({i} of {len(todo)})")
    done = finished_runs(setup.root, setup.baseline_rev)
    return {setup.run_name(r, s): done[setup.run_name(r, s)] for r, s in setup.runs()
            if setup.run_name(r, s) in done}


def collect(setup: Setup) -> dict[str, dict[str, Any]]:
    """Each finished run's metrics files, read from the experiment through DVC:
    {name: {"row", "seed", "commit", "metrics": {stem: {...}}}}."""
    import dvc.api

    if not setup.baseline_rev:
        setup.baseline_rev = baseline_rev(setup.root)
    done = finished_runs(setup.root, setup.baseline_rev)
    out = {}
    for row, seed in setup.runs():
        name = setup.run_name(row, seed)
        if name not in done:
            continue
        check_finished(setup, name, done[name], row, seed)
        files = {stem: json.loads(dvc.api.read(path, repo=str(setup.root), rev=done[name]))
                 for stem, path in setup.metric_files.items()
                 if stem in {s for s, _ in setup.metrics}}
        out[name] = {"row": row, "seed": seed, "commit": done[name], "metrics": files}
    return out


def protocol(setup: Setup) -> str:
    """The evaluation every run used: the eval group of params with the -S overrides."""
    import copy

    params = copy.deepcopy(setup.params)
    for key, value in setup.extra.items():
        assign(params, key, value)
    ev = params.get("eval") or {}
    shown = ", ".join(f"{k}={ev[k]}" for k in ("split", "setting", "protocol", "mode",
                                                 "missing", "limit") if k in ev)
    return (f"`pipeline evaluate` of each run's best.pt ({shown}; null protocol / missing: "
            "the dataset's default, see metrics/report.md of any run)")


def report(setup: Setup, check: bool = True) -> list[Path]:
    """Render ablations/<plan>/report.{md,json} and plot.png from the finished runs."""
    from pipeline import ablation_report

    runs = collect(setup)
    if not runs:
        raise PipelineError(f"no finished run of plan {setup.plan.name!r} on commit "
                            f"{setup.baseline_rev[:7]}; run `pipeline ablate "
                            f"{setup.plan.name}` first")
    context = {"teacher": teacher_info(setup), "protocol": protocol(setup)}
    summary = ablation_report.summarise(setup, runs)
    return ablation_report.write(summary, context, setup.out)
