"""The set-up the sample benchmarks share: the generated sample, the fitted default teacher
and its cache, all kept in one work folder so a second run (or another script given the
same folder) reuses them instead of fitting the teacher again (about 2 minutes on 2 cores).

Used by `ablation_sample.py` and `codealign.py`; imported as a sibling module (both run as
`python benchmarks/<script>.py`, which puts this folder on `sys.path`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.config import build
from pipeline.datasets.sample import SampleSpec, make_sample
from stages.teacher.fit import FitConfig, fit_default_teacher, format_quality
from stages.teacher.run import RunReport, TeacherConfig, cache_teacher


@dataclass
class FittedSample:
    root: Path  # the generated sample
    teacher: TeacherConfig  # params.yaml's stage one, reading the fitted teacher
    quality: dict[str, Any]  # teacher.json's quality on val
    random_init_quality: dict[str, Any]

    def describe_quality(self) -> str:
        return format_quality(self.quality, self.random_init_quality)


def fitted_sample(work: Path, params: dict[str, Any], root: Path | None = None,
                  spec: SampleSpec | None = None) -> FittedSample:
    """Generate the sample (default `work/deliver-sample`, kept if it already matches) and
    fit the default teacher into `work/teacher` with params.yaml's `teacher.fit`,
    `teacher.modality_branch` and `teacher.class_prompt` (kept if already fitted so)."""
    root = root or work / "deliver-sample"
    make_sample(root, spec or SampleSpec())
    teacher = TeacherConfig.from_params(params, {"dataset": "sample", "root": str(root)})
    fit = build(FitConfig, dict((params.get("teacher") or {}).get("fit") or {}), "teacher.fit")
    fitted = fit_default_teacher(root, work / "teacher", fit, teacher.branch_map(),
                                 teacher.class_prompt, progress=False)
    teacher.teacher_root = str(work / "teacher")
    return FittedSample(root, teacher, fitted.manifest["quality"],
                        fitted.manifest["random_init_quality"])


def store_path(work: Path, dense_k: int | None = None) -> Path:
    """Where a stage-one store of the fitted teacher lives in `work`: one name per kind of
    store, so each script finds what another one built."""
    return work / (f"codes{dense_k}.zarr" if dense_k else "sample.zarr")


def build_cache(sample: FittedSample, out: Path, dense_k: int | None = None,
                **options: Any) -> RunReport:
    """Stage one of the fitted teacher into `out`, with `codebook:dense_k` patch codes when
    given (`options`: other `TeacherConfig.dense_*` settings). A store in `out` built the same
    way is kept (nothing computed); one built differently (an earlier teacher, other codes)
    is rebuilt."""
    cfg = replace(sample.teacher, out=str(out), on_mismatch="rebuild",
                  dense=f"codebook:{dense_k}" if dense_k else None, **options)
    return cache_teacher(cfg)
