"""A plan resolved against its pipeline: `Setup`, what every run and the report read.

`prepare` loads the plan, reads the pipeline's stages and params (the DELIVER pipeline's own
params.yaml for `--pipeline pipelines/deliver/dvc.yaml`), checks every row's keys and
values against the stages its target runs, and picks the metrics; no DVC call is made, so
a bad plan fails in one line before anything runs.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from any2seg.errors import PipelineError
from pipeline.ablation.dag import Pipeline, load_pipeline
from pipeline.ablation.plan import Plan, assign, check_rows, load_plan, lookup
from pipeline.ablation.shipped_recipes import (
    RUN_ONLY,
    SHIPPED_RECIPES,
    differing_keys,
    recipe_digest,
)

EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
HEADLINE = {"mss": "mIoU", "miss": "mean_mIoU", "sensor": "mean_of_groups_mIoU"}


def _short(value: Any) -> str:
    return "absent" if value is None else str(value)


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
    dag: Pipeline
    baseline_rev: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)  # untracked inputs in the repository
    outside: list[str] = field(default_factory=list)  # inputs outside it (read in place)
    common: dict[str, Any] = field(default_factory=dict)  # the plan's every_row and recipe
    recipe: dict[str, Any] | None = None  # the plan's recipe for this pipeline, if any

    @property
    def paper_setting(self) -> bool:
        """The runs are the paper's experiment: the plan has a recipe for this pipeline,
        the pipeline's params are its dataset's shipped recipe (the authors') and no -S
        changes what the weights come out as (only how they are computed)."""
        return self.recipe is not None and not self.off_recipe()

    def off_recipe(self) -> list[str]:
        """What takes these runs away from the recipe: -S keys, and params keys whose
        value differs from the dataset's shipped recipe (pipeline.ablation.shipped_recipes),
        paths and how-to-compute keys aside."""
        off = [f"-S {k}" for k in self.extra if k not in RUN_ONLY]
        name = str((self.params.get("dataset") or {}).get("name", ""))
        digest = SHIPPED_RECIPES.get(name)
        if digest is None:
            return [*off, f"no shipped recipe for {name!r}"]
        if recipe_digest(self.params) == digest:
            return off
        shipped = self._shipped_version(digest)
        if shipped is None:
            return [*off, f"{self._rel_params()} differs from the shipped {name} recipe "
                          f"(sha256 {digest[:12]}...) and no commit of this repository "
                          "holds that recipe, so the differing keys cannot be named"]
        return off + [f"{k} ({_short(mine)} here, {_short(theirs)} in the shipped recipe)"
                      for k, mine, theirs in differing_keys(self.params, shipped)]

    def _shipped_version(self, digest: str) -> dict[str, Any] | None:
        """The newest committed version of the pipeline's params file whose digest is
        `digest`, else None (no such commit, or no git history of the file)."""
        rel = self._rel_params()
        for rev in git(self.root, "log", "--format=%H", "--", rel, check=False).split():
            try:
                params = yaml.safe_load(git(self.root, "show", f"{rev}:{rel}"))
            except (PipelineError, yaml.YAMLError):
                continue
            if isinstance(params, dict) and recipe_digest(params) == digest:
                return params
        return None

    def _rel_params(self) -> str:
        return self.params_path.resolve().relative_to(self.root).as_posix()

    @property
    def linked(self) -> bool:
        """Runs in linked workspaces: they read data DVC does not hold (see
        pipeline.ablation.workspace); else each run is a `dvc exp run --temp`."""
        return bool(self.links or self.outside)

    @property
    def target(self) -> str:
        return self.plan.target

    def run_name(self, row: str, seed: int) -> str:
        return f"{self.plan.name}-{row}-s{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """(row, seed) in seed-major order: the first runs give every row one seed."""
        return [(row, seed) for seed in self.seeds for row in self.rows]

    def overrides(self, row: str, seed: int) -> dict[str, Any]:
        """What the run sets: the plan's every_row and recipe, the -S overrides (which win
        over those), the row's own and its seed."""
        return {**self.common, **self.extra, **self.rows[row], self.plan.seed: seed}

    @property
    def out(self) -> Path:
        return self.root / "ablations" / self.plan.name


def git(root: Path, *args: str, check: bool = True) -> str:
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise PipelineError(f"git {' '.join(args)} failed in {root}: "
                            f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
    return result.stdout


def parse_set(values: tuple[str, ...] | list[str], params_file: Path | None = None
              ) -> dict[str, Any]:
    """`-S key=value` pairs; values are YAML, as DVC reads them. As with `dvc exp run`, a
    key may name its params file (`pipelines/deliver/params.yaml:train.lr=1e-4`): it must
    be the pipeline's own (`params_file`)."""
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PipelineError(f"-S expects KEY=VALUE (a dotted params.yaml key), got {item!r}")
        file, colon, key = key.strip().rpartition(":")
        if colon and params_file is not None and \
                Path(file).resolve() != params_file.resolve():
            raise PipelineError(f"-S {item}: {file} is not the pipeline's params file "
                                f"({os.path.relpath(params_file)}); name that file or none")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str) and EXPONENT.fullmatch(parsed.strip()):
            parsed = float(parsed)  # 1e-4: a number in YAML 1.2 (DVC's), a string in 1.1
        out[key.strip()] = parsed
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
    top = git(dvc_yaml.parent, "rev-parse", "--show-toplevel", check=False).strip()
    if not top:
        raise PipelineError(f"{dvc_yaml.parent} is not in a git repository; ablate records "
                            "runs as DVC experiments of a commit (git init, git add -A, "
                            "git commit)")
    root = Path(top).resolve()
    params_path = dvc_yaml.parent / "params.yaml"
    from any2seg.config import load_params

    params = load_params(params_path)
    rel_params = os.path.relpath(params_path, Path.cwd())
    dag = load_pipeline(dvc_yaml, root, params, params_path)
    if plan.target not in dag.stages:
        raise PipelineError(f"{plan.path}: target {plan.target!r}: {dvc_yaml} has no such "
                            f"stage (its stages: {', '.join(dag.stages)})")
    extra = parse_set(sets, params_path)
    recipe = plan.recipe(os.path.relpath(dvc_yaml, root))
    common = {**plan.every_row, **((recipe or {}).get("params") or {})}
    selected = [r.strip() for r in rows.split(",") if r.strip()] if rows else []
    checked = check_rows(plan, selected, extra, params,
                         {s: list(dag.stages[s].params) for s in dag.ablated(plan.target)},
                         {s: list(dag.stages[s].params) for s in dag.frozen(plan.target)},
                         rel_params, common)
    _check_values({r: {**common, **extra, **o} for r, o in checked.items()}, params,
                  rel_params, dag.ablated(plan.target))
    files = {Path(path).stem: path for path in dag.stages[plan.target].metrics}
    if plan.metrics:
        wanted = [tuple(m.split(".", 1)) for m in plan.metrics]
    elif plan.target == "evaluate":
        wanted = list(HEADLINE.items())
    else:  # load_plan requires metrics for another target
        wanted = []
    for name in metrics:
        stem, dot, key = name.partition(".")
        if not dot or not key:
            raise PipelineError(f"--metric expects FILE.KEY as in metrics/FILE.json, e.g. "
                                f"mss.mAcc or miss.rgb-depth, got {name!r}")
        if (stem, key) not in wanted:
            wanted.append((stem, key))
    unknown = [s for s, _ in wanted if s not in files]
    if unknown:
        raise PipelineError(f"metric {unknown[0]}.*: the {plan.target} stage of {dvc_yaml} "
                            f"writes no {unknown[0]}.json (it writes "
                            f"{', '.join(files) or 'no metrics file'})")
    base_seed = extra.get(plan.seed, lookup(params, plan.seed)[1])
    if not isinstance(base_seed, int) or isinstance(base_seed, bool):
        raise PipelineError(f"{rel_params}: {plan.seed} must be an integer, got {base_seed!r}")
    extra.pop(plan.seed, None)
    return Setup(plan, root, dvc_yaml, params_path, params, checked,
                 [base_seed + i for i in range(seeds)], wanted, files, dag, extra=extra,
                 common=common, recipe=recipe)


def _check_values(rows: dict[str, dict[str, Any]], params: dict[str, Any], source: str,
                  stages: list[str]) -> None:
    """Every row's values in range, by building the configs the ablated stages build."""
    import copy

    from any2seg.config import Where, build
    from stages.student.codealign.config import CodeAlignConfig
    from stages.student.config import TrainConfig
    from stages.student.eval_config import EvalConfig
    from stages.student.model import StudentConfig

    for row, overrides in rows.items():
        merged = copy.deepcopy(params)
        for key, value in overrides.items():
            assign(merged, key, value)
        try:
            if "train" in stages:
                TrainConfig.from_params(merged, {}, source)
            if "evaluate" in stages:
                EvalConfig.from_params(merged, {}, source)
            if any(s.startswith("codealign") for s in stages):
                ca = build(CodeAlignConfig, dict(merged.get("codealign") or {}),
                           Where("codealign", source))
                ca.validate(Where("codealign", source))
                st = build(StudentConfig, dict(merged.get("student") or {}),
                           Where("student", source))
                st.validate(Where("student", source))
        except PipelineError as exc:
            raise PipelineError(f"row {row!r}: {exc}") from exc


