"""What a training run will cost, before it starts: its steps, from the recipe and the size
of the train split, times a step time the caller names the source of (measured or
declared). Needs neither weights nor data: without the data the split size is the
dataset's published one."""

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
            n = len(datasets.load(cfg.dataset, root, "train", modalities=cfg.modalities))
            return n, f"counted in {root}"
        except (PipelineError, OSError):
            pass
    if declared is not None:
        return declared, "declared in params"
    if cfg.dataset in DECLARED_TRAIN_SAMPLES:
        return DECLARED_TRAIN_SAMPLES[cfg.dataset], f"the published {cfg.dataset} train split"
    return None, f"{root} is not there and {cfg.dataset} has no published size"


@dataclass(frozen=True)
class Estimate:
    """Steps x seconds per step; `time_from` says whether the step time was measured or
    declared, and by whom."""

    steps: int | None
    step_seconds: float | None
    time_from: str

    @property
    def seconds(self) -> float | None:
        if self.steps is None or self.step_seconds is None:
            return None
        return self.steps * self.step_seconds


def duration(seconds: float) -> str:
    """1.5 h, 12 min, 40 s."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"
