"""What a training run will cost, before it starts: its steps (from the recipe and the size
of the train split) times a step time, and where each number comes from.

A step time is either *measured* (by a benchmark of this repository, its result file named)
or *declared* (an estimate written down, its inputs named), scaled to the run asked for:
linearly in the pixels a step pushes through the encoder (global batch x modalities x
crop^2), divided over the ranks (`nproc`, communication not counted). An estimate always
says which figure it used; with no figure for the backbone on the device there is no
estimate, and it says how to get one. Validation is not counted. Needs neither weights nor
data: without the data the split size is the dataset's published one. `pipeline train
--dry-run` and `pipeline ablate --dry-run` print it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from any2seg.errors import PipelineError
from stages.student.config import TrainConfig

# published train-split sizes, for estimates made before the data is there
DECLARED_TRAIN_SAMPLES = {"deliver": 3983}  # DELIVER front view (reference.md)

def train_steps(cfg: TrainConfig, train_samples: int) -> int:
    """The optimiser steps a run takes: train.steps, else train.epochs over the train split
    in global batches (the one rule `pipeline train` uses)."""
    if cfg.steps:
        return int(cfg.steps)
    return math.ceil(cfg.epochs * max(1, train_samples // cfg.batch_size))


def train_samples(cfg: TrainConfig, root: Path, declared: int | None = None
                  ) -> tuple[int | None, str]:
    """(size of the train split, where that number comes from): counted in the data at
    `root` when it is there, else `declared` or the dataset's published size."""
    from any2seg import datasets

    if root.exists():
        try:
            only = {"modalities": cfg.modalities} if cfg.modalities else {}  # null: all
            n = len(datasets.load(cfg.dataset, root, "train", **only))
            return n, f"counted in {root}"
        except (PipelineError, OSError):
            pass
    if declared is not None:
        return declared, "declared in params"
    if cfg.dataset in DECLARED_TRAIN_SAMPLES:
        return DECLARED_TRAIN_SAMPLES[cfg.dataset], f"the published {cfg.dataset} train split"
    return None, f"{root} is not there and {cfg.dataset} has no published size"


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimiser step of one configuration, and where the figure comes from."""

    device: str  # "cpu" or "cuda"
    backbone: str
    crop: int
    batch: int  # global batch
    modalities: int
    seconds: float
    kind: str  # "measured" or "declared"
    source: str


STEP_TIMES: tuple[StepTime, ...] = (
    StepTime("cpu", "mit_b0", 128, 2, 4, 0.1792, "measured",
             "benchmarks/results/student_step.json, row 'LSCD, cached targets' (2-core CPU, "
             "median of 20 steps, head width 256)"),
    StepTime("cuda", "mit_b2", 1024, 8, 4, 0.73, "declared",
             "docs/performance.md, 'The paper's training': 8.6 TFLOP per sample at an "
             "assumed 30 % of an A100's 312 TFLOP/s bf16; not measured on a GPU"),
)


@dataclass(frozen=True)
class Estimate:
    """Steps x seconds per step (None: not known), and `basis`: where the step time comes
    from, measured or declared."""

    steps: int | None
    step_seconds: float | None
    basis: str

    @property
    def seconds(self) -> float | None:
        if self.steps is None or self.step_seconds is None:
            return None
        return self.steps * self.step_seconds

    def line(self) -> str:
        if self.step_seconds is None:
            return f"no estimate: {self.basis}"
        per = f"{self.step_seconds:.3g} s per step"
        if self.seconds is None:
            return f"{per} ({self.basis}); steps unknown, so no total"
        return f"{duration(self.seconds)} = {self.steps:,} steps x {per} ({self.basis})"


def duration(seconds: float) -> str:
    """`3 h 12 min`, `4 min 10 s`, `12 s`: what a person plans with."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{seconds:.3g} s"


def estimate(device: str, backbone: str, crop: int, batch: int, modalities: int,
             steps: int | None, nproc: int = 1,
             table: tuple[StepTime, ...] = STEP_TIMES) -> Estimate:
    """Training time of `steps` steps of `backbone` at `crop`, global batch `batch` over
    `modalities` modalities on `device` ("cpu" or "cuda", resolved), `nproc` ranks."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    same = [t for t in table if t.device == kind and t.backbone == backbone]
    if not same:
        known = ", ".join(sorted({f"{t.backbone} on {t.device}" for t in table}))
        return Estimate(steps, None,
                        f"no step time for {backbone} on {kind} (known: {known}); measure "
                        "one with `python benchmarks/student_step.py` and add it to "
                        "stages/student/estimate.py STEP_TIMES")
    work = batch * modalities * crop * crop
    ref = min(same, key=lambda t: abs(t.batch * t.modalities * t.crop ** 2 - work))
    scale = work / (ref.batch * ref.modalities * ref.crop ** 2)
    per_step = ref.seconds * scale / nproc
    basis = (f"{ref.kind}: {ref.seconds:g} s for {ref.backbone}, batch {ref.batch} x "
             f"{ref.modalities} modalities, crop {ref.crop}, on {ref.device}, from "
             f"{ref.source}")
    if scale != 1:
        basis += f"; scaled x {scale:.4g} by batch x modalities x crop^2"
    if nproc > 1:
        basis += f"; divided over {nproc} ranks (communication not counted)"
    basis += "; validation not counted"
    return Estimate(steps, per_step, basis)
