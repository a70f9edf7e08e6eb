"""The dvc.yaml an ablation runs, resolved as DVC resolves it: `${key}` from the pipeline's
params file, paths relative to each stage's `wdir`, and the stage graph from deps and outs.

An ablation runs one target stage (`evaluate`, or `codealign_evaluate` for a CodeAlign
plan) and what it depends on. Of those stages, stage one and what feeds it (the
`cache_teacher` stage and its ancestors: the data and the teacher) are frozen: they must be
up to date before the first run and no row may change a key they read. The rest are the
stages a row may change. Reading dvc.yaml here (not through DVC) keeps plan checks free of
a DVC repository and fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from any2seg.errors import PipelineError
from pipeline.ablation.plan import lookup

STAGE_ONE = "cache_teacher"
VAR = re.compile(r"\$\{\s*([A-Za-z0-9_.-]+)\s*\}")


@dataclass(frozen=True)
class Stage:
    """One stage: paths relative to the repository root, and the params keys it lists from
    the pipeline's own params file."""

    name: str
    cmd: str  # interpolated
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # outs, metrics and plots
    metrics: tuple[str, ...]
    params: tuple[str, ...]


@dataclass(frozen=True)
class Pipeline:
    path: Path  # dvc.yaml
    root: Path  # the git / DVC repository
    stages: dict[str, Stage]  # in file order

    def address(self, stage: str) -> str:
        """The stage as DVC's command line names it from the repository root."""
        if self.path.parent == self.root:
            return stage
        return f"{os.path.relpath(self.path, self.root)}:{stage}"

    def parents(self, stage: str) -> list[str]:
        mine = self.stages[stage]
        return [s.name for s in self.stages.values() if s.name != stage and
                any(_overlap(d, o) for d in mine.deps for o in s.outs)]

    def runs(self, target: str) -> list[str]:
        """`target` and every stage it depends on, in file order."""
        seen, todo = {target}, [target]
        while todo:
            for parent in self.parents(todo.pop()):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        return [s for s in self.stages if s in seen]

    def frozen(self, target: str) -> list[str]:
        """The stages `target` runs that an ablation must not rerun: stage one and its
        inputs (none when the target does not read the teacher cache)."""
        if STAGE_ONE not in self.stages:
            return []
        one = set(self.runs(STAGE_ONE))
        return [s for s in self.runs(target) if s in one]

    def ablated(self, target: str) -> list[str]:
        """The stages a row may change: what `target` runs, less the frozen ones."""
        frozen = set(self.frozen(target))
        return [s for s in self.runs(target) if s not in frozen]


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def interpolate(text: str, params: dict[str, Any]) -> str:
    """`${key}` replaced by the params value (left as it is when params has no such key)."""
    def value(match: re.Match) -> str:
        found, got = lookup(params, match.group(1))
        return str(got) if found and not isinstance(got, dict | list) else match.group(0)
    return VAR.sub(value, text)


def _paths(entries: Any) -> list[str]:
    out = []
    for entry in entries or []:
        out.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return out


def load_pipeline(dvc_yaml: Path, root: Path, params: dict[str, Any],
                  params_path: Path) -> Pipeline:
    """Read `dvc_yaml` (an absolute path inside `root`) with `params` (the file at
    `params_path`, DVC's default vars for it) interpolated."""
    spec = yaml.safe_load(dvc_yaml.read_text()) or {}
    stages = spec.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise PipelineError(f"{dvc_yaml}: no stages; ablate runs a DVC pipeline (dvc.yaml "
                            "with train / evaluate stages)")
    out = {}
    for name, body in stages.items():
        body = body or {}
        if "foreach" in body or "matrix" in body:
            raise PipelineError(f"{dvc_yaml}: stage {name!r} uses foreach/matrix, which "
                                "ablate does not read; list the stages one by one")
        wdir = dvc_yaml.parent / interpolate(str(body.get("wdir", ".")), params)

        def rel(path: str, wdir: Path = wdir) -> str:
            return os.path.normpath(os.path.relpath(wdir / interpolate(path, params), root))

        keys = []
        for entry in body.get("params") or []:
            files = {"params.yaml": [entry]} if isinstance(entry, str) else entry
            for file, listed in (files or {}).items():
                if (wdir / file).resolve() == params_path.resolve():
                    keys += [str(k) for k in (listed or [])]
        metrics = [rel(p) for p in _paths(body.get("metrics"))]
        outs = [rel(p) for p in _paths(body.get("outs")) + _paths(body.get("plots"))]
        out[name] = Stage(name, interpolate(" ".join(str(body.get("cmd", "")).split()), params),
                          tuple(rel(p) for p in _paths(body.get("deps"))),
                          tuple(outs + metrics), tuple(metrics), tuple(keys))
    return Pipeline(dvc_yaml, root, out)
