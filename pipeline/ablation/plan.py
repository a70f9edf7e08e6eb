"""Ablation plans: named rows of params.yaml overrides, with an explicit baseline row.

A plan is data (`configs/ablations/NAME.yaml`, found through the same configs lookup as
every preset), so adding a row needs no code:

    description: LSCD loss terms (paper Table 5)
    baseline: full
    rows:
      full: {}                                  # the unchanged params
      no-Lcr: {train.loss.w_cr: 0.0}

Keys are the dotted params.yaml keys `dvc exp run -S` takes. A plan runs the `evaluate`
stage and reports its headline metrics unless it names another target stage, its metrics
and the key its seeds vary (CodeAlign is its own chain of stages):

    target: codealign_evaluate
    metrics: [codealign.mean.translated]        # FILE.KEY of the target's metrics files
    seed: codealign.train_seed

A plan may also carry what makes it the paper's experiment: `every_row` (overrides of
every row, the baseline included: the table's loss switches and modalities), `recipe`
(overrides added only when the plan runs a given pipeline, e.g. SegFormer-B0 on
`pipelines/deliver/dvc.yaml`, with a declared `step_seconds` for `--dry-run`'s estimate)
and `reference` (the paper's published figures per row, shown beside the measured means
only where the recipe applied):

    every_row: {train.loss.w_base: 1.0, train.modalities: [rgb, depth]}
    recipe:
      pipelines/deliver/dvc.yaml:
        params: {student.backbone: mit_b0}
        step_seconds: 0.2                       # declared, with its source in a comment
    reference:
      source: Any2Seg Table 5 (DELIVER val, MSS)
      values: {base: {mss.mIoU: 61.93}}         # published means
      diffs: {Lse-dual: {mss.mIoU: 0.81}}       # published changes to the baseline

Every check here runs before anything trains, and each failure is one line naming the
plan file and the row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from any2seg.config import configs_dir, load_yaml
from any2seg.errors import PipelineError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
NAME_RULE = "letters, digits, - and _ (it becomes part of a DVC experiment name)"
PLAN_KEYS = ("description", "baseline", "rows", "target", "metrics", "seed", "every_row",
             "recipe", "reference")
RECIPE_KEYS = ("params", "step_seconds")
REFERENCE_KEYS = ("source", "values", "diffs")


@dataclass(frozen=True)
class Plan:
    """A loaded plan: `rows` maps row names (baseline included) to their overrides."""

    name: str
    path: Path
    description: str
    baseline: str
    rows: dict[str, dict[str, Any]]
    target: str = "evaluate"  # the stage each run reproduces (with what it depends on)
    metrics: tuple[str, ...] = ()  # FILE.KEY; none: the evaluate stage's headline metrics
    seed: str = "train.seed"  # the key --seeds varies
    every_row: dict[str, Any] = field(default_factory=dict)  # overrides of every row
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)  # dvc.yaml -> recipe
    reference: dict[str, Any] = field(default_factory=dict)  # source, values, diffs

    def recipe(self, pipeline: str) -> dict[str, Any] | None:
        """The recipe for `pipeline` (dvc.yaml relative to the repository), None if none."""
        return self.recipes.get(pipeline)


def plan_file(name: str) -> Path:
    """`name` as a path (`my_plan.yaml`) or a shipped plan (`table5`)."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise PipelineError(f"ablation plan {path} does not exist")
        return path
    base = configs_dir()
    folder = base / "ablations" if base is not None else None
    path = folder / f"{name}.yaml" if folder is not None else None
    if path is None or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml")) if folder and folder.is_dir() \
            else []
        raise PipelineError(f"no ablation plan {name!r}; shipped plans: "
                            f"{', '.join(known) or 'none found'} (or give a path to a "
                            "plan .yaml)")
    return path


def load_plan(name: str) -> Plan:
    """Read and check a plan's structure (not yet its keys: see `check_rows`)."""
    path = plan_file(name)
    data = load_yaml(path)
    stem = path.stem
    if not NAME.match(stem):
        raise PipelineError(f"{path}: the plan's file name must be {NAME_RULE}, got {stem!r}")
    unknown = sorted(set(data) - set(PLAN_KEYS))
    if unknown:
        raise PipelineError(f"{path}: unknown key {unknown[0]!r}; a plan has "
                            f"{', '.join(PLAN_KEYS)}")
    rows = data.get("rows")
    if not rows:
        raise PipelineError(f"{path}: the plan has no rows; give `rows:` with the baseline "
                            "row and at least one row that changes something")
    if not isinstance(rows, dict):
        raise PipelineError(f"{path}: rows must map row names to overrides "
                            f"({{key: value}}), got {type(rows).__name__}")
    for row, overrides in rows.items():
        if not isinstance(row, str) or not NAME.match(row):
            raise PipelineError(f"{path}: row name {row!r} must be {NAME_RULE}" +
                                (" (no commas: --rows is comma-separated)"
                                 if "," in str(row) else ""))
        if overrides is not None and not isinstance(overrides, dict):
            raise PipelineError(f"{path}: row {row!r} must map params keys to values, got "
                                f"{overrides!r}")
        for key in overrides or {}:
            if not isinstance(key, str) or not key:
                raise PipelineError(f"{path}: row {row!r} has a key {key!r} that is not a "
                                    "dotted params.yaml key")
    baseline = data.get("baseline")
    if baseline not in rows:
        raise PipelineError(f"{path}: baseline must name one of the rows "
                            f"({', '.join(rows)}), got {baseline!r}")
    if rows[baseline]:
        raise PipelineError(f"{path}: the baseline row {baseline!r} must be the unchanged "
                            f"params ({{}}), got {rows[baseline]!r}")
    if len(rows) < 2:
        raise PipelineError(f"{path}: the plan holds only its baseline {baseline!r}; add a "
                            "row that changes something")
    target, seed = data.get("target", "evaluate"), data.get("seed", "train.seed")
    for key, value in (("target", target), ("seed", seed)):
        if not isinstance(value, str) or not value:
            raise PipelineError(f"{path}: {key} must be a "
                                + ("stage name of dvc.yaml" if key == "target" else
                                   "dotted params.yaml key") + f", got {value!r}")
    metrics = data.get("metrics") or []
    if not isinstance(metrics, list) or not all(
            isinstance(m, str) and "." in m.strip(".") for m in metrics):
        raise PipelineError(f"{path}: metrics must be a list of FILE.KEY (a key of the "
                            f"target's metrics/FILE.json, e.g. mss.mIoU), got {metrics!r}")
    if target != "evaluate" and not metrics:
        raise PipelineError(f"{path}: a plan with target {target!r} must name its metrics "
                            "(FILE.KEY of the metrics files that stage writes)")
    every_row = _overrides(path, "every_row", data.get("every_row"))
    recipes = data.get("recipe") or {}
    if not isinstance(recipes, dict):
        raise PipelineError(f"{path}: recipe must map a dvc.yaml path (relative to the "
                            f"repository) to {{params: ..., step_seconds: ...}}, got {recipes!r}")
    for pipeline, recipe in recipes.items():
        if not isinstance(recipe, dict) or set(recipe) - set(RECIPE_KEYS):
            raise PipelineError(f"{path}: recipe {pipeline!r} must hold "
                                f"{' and '.join(RECIPE_KEYS)}, got {recipe!r}")
        _overrides(path, f"recipe {pipeline!r}", recipe.get("params"))
        seconds = recipe.get("step_seconds")
        if seconds is not None and (isinstance(seconds, bool) or
                                    not isinstance(seconds, int | float) or seconds <= 0):
            raise PipelineError(f"{path}: recipe {pipeline!r}: step_seconds must be a number "
                                f"> 0 (seconds per training step), got {seconds!r}")
    reference = _reference(path, data.get("reference"), rows)
    return Plan(stem, path, str(data.get("description") or ""), baseline,
                {r: dict(o or {}) for r, o in rows.items()}, target, tuple(metrics), seed,
                every_row, {str(k): dict(v) for k, v in recipes.items()}, reference)


def _overrides(path: Path, what: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise PipelineError(f"{path}: {what} must map dotted params.yaml keys to values, "
                            f"got {value!r}")
    return dict(value)


def _reference(path: Path, value: Any, rows: dict[str, Any]) -> dict[str, Any]:
    """The paper's figures: {source, values: {row: {FILE.KEY: number}}, diffs: same}."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - set(REFERENCE_KEYS) or \
            not value.get("source"):
        raise PipelineError(f"{path}: reference must hold source (where the figures are "
                            f"published) and values and/or diffs, got {value!r}")
    for part in ("values", "diffs"):
        for row, figures in (value.get(part) or {}).items():
            if row not in rows:
                raise PipelineError(f"{path}: reference {part}: no row {row!r} in the plan")
            if not isinstance(figures, dict) or not all(
                    isinstance(k, str) and "." in k and isinstance(v, int | float) and
                    not isinstance(v, bool) for k, v in figures.items()):
                raise PipelineError(f"{path}: reference {part} of row {row!r} must map "
                                    f"FILE.KEY to a number, got {figures!r}")
    return {"source": str(value["source"]), "values": dict(value.get("values") or {}),
            "diffs": dict(value.get("diffs") or {})}


def lookup(params: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in nested params."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def leaves(params: dict[str, Any], key: str) -> dict[str, Any]:
    """{dotted key: value} of every leaf under `key` (a group or a single value)."""
    found, node = lookup(params, key)
    if not found:
        return {}
    if not isinstance(node, dict) or not node:
        return {key: node}
    out = {}
    for sub in node:
        out.update(leaves(params, f"{key}.{sub}"))
    return out


def assign(params: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key in nested params (the parents exist: `lookup` found the key)."""
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value


def _under(key: str, entry: str) -> bool:
    return key == entry or key.startswith(entry + ".") or entry.startswith(key + ".")


def check_rows(plan: Plan, selected: list[str], extra: dict[str, Any], params: dict[str, Any],
               ablated: dict[str, list[str]], frozen: dict[str, list[str]],
               params_path: str = "params.yaml", common: dict[str, Any] | None = None
               ) -> dict[str, dict[str, Any]]:
    """Every selected row's overrides (on top of `common`, the plan's every_row and recipe,
    and `extra`, the command line's -S), checked
    against params.yaml and the pipeline: keys that exist, that only the stages the target
    runs after stage one read (`ablated`: stage -> its params keys; `frozen`: stage one and
    its inputs, which never rerun), and rows that really differ from the baseline and from
    each other. Returns {row: its own overrides} for the selected rows, baseline first."""
    where = plan.path
    unknown_rows = [r for r in selected if r not in plan.rows]
    if unknown_rows:
        raise PipelineError(f"--rows: {plan.path} has no row {unknown_rows[0]!r}; its rows: "
                            f"{', '.join(plan.rows)}")
    names = [plan.baseline] + [r for r in (selected or plan.rows) if r != plan.baseline]
    if len(names) < 2:
        raise PipelineError(f"--rows names only the baseline {plan.baseline!r}; add a row "
                            f"of {', '.join(r for r in plan.rows if r != plan.baseline)}")
    readable = [k for keys in ablated.values() for k in keys]
    upstream = {k: s for s, keys in frozen.items() for k in keys}

    def check_key(key: str, origin: str) -> None:
        found, _ = lookup(params, key)
        if not found:
            raise PipelineError(f"{origin}: unknown parameter {key!r}: {params_path} has no "
                                "such key (keys are dotted, e.g. train.loss.w_cr)")
        clash = next((s for k, s in upstream.items() if _under(key, k)), None)
        if clash is not None:
            raise PipelineError(f"{origin}: {key!r} cannot be ablated (stage {clash!r} reads "
                                f"it); ablations change only what {', '.join(ablated)} read, "
                                f"so {', '.join(frozen)} never "
                                f"{'reruns' if len(frozen) == 1 else 'rerun'}")
        if not any(_under(key, k) for k in readable):
            raise PipelineError(f"{origin}: {key!r} cannot be ablated: no stage that "
                                f"{plan.target!r} runs reads it ({', '.join(ablated)}); "
                                "give the plan the target stage that uses it")

    check_key(plan.seed, f"{where}: seed")
    for key in common or {}:
        if key == plan.seed:
            raise PipelineError(f"{where}: every_row / recipe sets {key}; the seeds come "
                                f"from --seeds ({key}, {key} + 1, ...)")
        check_key(key, f"{where}: every_row / recipe")
    for key in extra:
        check_key(key, "-S")
    import copy

    base = copy.deepcopy(params)  # what the baseline row runs
    for key, value in {**(common or {}), **extra}.items():
        assign(base, key, value)
    out: dict[str, dict[str, Any]] = {}
    seen: dict[tuple, str] = {}
    for row in names:
        overrides = plan.rows[row]
        for key in overrides:
            if key == plan.seed:
                raise PipelineError(f"{where}: row {row!r} sets {key}; the seeds come "
                                    f"from --seeds ({key}, {key} + 1, ...)")
            check_key(key, f"{where}: row {row!r}")
            if key in extra:
                raise PipelineError(f"-S {key} conflicts with row {row!r} of {where}, which "
                                    "sets it; leave that row out with --rows")
        changed = {k: v for k, v in overrides.items() if lookup(base, k)[1] != v}
        if row != plan.baseline and not changed:
            raise PipelineError(f"{where}: row {row!r} changes nothing ({params_path}"
                                f"{' with every_row / recipe / -S' if base != params else ''} "
                                f"already has {overrides or 'every value'}): it duplicates the "
                                f"baseline {plan.baseline!r}; drop it or give it an override")
        signature = tuple(sorted((k, repr(v)) for k, v in changed.items()))
        if signature in seen and row != plan.baseline:
            raise PipelineError(f"{where}: row {row!r} sets the same values as row "
                                f"{seen[signature]!r}; drop one of them")
        seen[signature] = row
        out[row] = dict(overrides)
    return out
