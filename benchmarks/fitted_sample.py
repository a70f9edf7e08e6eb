"""The set-up the sample benchmarks share: the generated sample, the fitted default teacher
and its cache, all kept in one work folder so a second run (or another script given the
same folder) reuses them instead of fitting the teacher again (54 CPU seconds on one
thread: benchmarks/results/fit_teacher.json).

Used by `teacher_codes.py` (and by `ablation_sample.py` before it called `pipeline ablate`);
imported as a sibling module (run as `python benchmarks/<script>.py`, which puts this folder
on `sys.path`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from any2seg.config import build
from any2seg.synth import SampleSpec, make_sample
from stages.teacher.default.config import FitConfig
from stages.teacher.default.fit import fit_default_teacher
from stages.teacher.default.quality import format_quality
from stages.teacher.run import RunReport, TeacherConfig, cache_teacher


@dataclass
class FittedSample:
    root: Path  # the generated sample
    teacher: TeacherConfig  # params.yaml's stage one, reading the fitted teacher
    quality: dict[str, Any]  # teacher.json's quality on val
    random_init_quality: dict[str, Any]
    tag: str = ""  # "" or the fit sample's name when the teacher was fitted on other frames

    def describe_quality(self) -> str:
        return format_quality(self.quality, self.random_init_quality)


def fitted_sample(work: Path, params: dict[str, Any], root: Path | None = None,
                  spec: SampleSpec | None = None, fit_spec: SampleSpec | None = None,
                  fit_overrides: dict[str, Any] | None = None) -> FittedSample:
    """Generate the sample (default `work/deliver-sample`, kept if it already matches) and
    fit the default teacher into `work/teacher` with params.yaml's `teacher.fit` (plus
    `fit_overrides`), `teacher.modality_branch` and `teacher.class_prompt` (kept if already
    fitted so).

    With `fit_spec` the teacher is fitted on another generated sample (its own scenes,
    e.g. more training frames than the student's) in `work/teacher-<name>`: a teacher that
    knows frames the student never sees, as LanguageBind knows data beyond DELIVER. Its
    quality figures are then measured on that sample's val split."""
    root = root or work / "deliver-sample"
    make_sample(root, spec or SampleSpec())
    teacher = TeacherConfig.from_params(params, {"dataset": "sample", "root": str(root)})
    fit = build(FitConfig, {**((params.get("teacher") or {}).get("fit") or {}),
                            **(fit_overrides or {})}, "teacher.fit")
    tag, fit_root = "", root
    if fit_spec is not None:
        tag = f"fit{fit_spec.train}-seed{fit_spec.seed}"
        fit_root = work / f"sample-{tag}"
        make_sample(fit_root, fit_spec)
    teacher_dir = work / (f"teacher-{tag}" if tag else "teacher")
    fitted = fit_default_teacher(fit_root, teacher_dir, fit, teacher.branch_map(fitting=True),
                                 teacher.class_prompt, progress=False)
    teacher.teacher_root = str(teacher_dir)
    return FittedSample(root, teacher, fitted.manifest["quality"],
                        fitted.manifest["random_init_quality"], tag)


def store_path(work: Path, dense_k: int | None = None, tag: str = "") -> Path:
    """Where a stage-one store of the fitted teacher lives in `work`: one name per kind of
    store (and per teacher, `FittedSample.tag`), so each script finds what another built."""
    name = f"codes{dense_k}" if dense_k else "sample"
    return work / (f"{name}-{tag}.zarr" if tag else f"{name}.zarr")


def build_cache(sample: FittedSample, out: Path, dense_k: int | None = None,
                **options: Any) -> RunReport:
    """Stage one of the fitted teacher into `out`, with `codebook:dense_k` patch codes when
    given (`options`: other `TeacherConfig.dense_*` settings). A store in `out` built the same
    way is kept (nothing computed); one built differently (an earlier teacher, other codes)
    is rebuilt."""
    cfg = replace(sample.teacher, out=str(out), on_mismatch="rebuild",
                  dense=f"codebook:{dense_k}" if dense_k else None, **options)
    return cache_teacher(cfg)
