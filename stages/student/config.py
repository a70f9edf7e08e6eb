"""`TrainConfig`: the `train` group of params.yaml, checked before anything is loaded
(`EvalConfig`, the `eval` group, is beside it in `eval_config`).

Defaults, then params.yaml, then command-line overrides (`from_params`); every error names
the key or flag the user wrote. What decides the weights (`settings`) is what a resumed
run must match.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from any2seg import datasets
from any2seg.config import DEFAULT_DATASET, Where, apply_overrides, build, dataset_root
from any2seg.devices import DEVICE_FORMS, is_device
from any2seg.errors import PipelineError
from stages.student.data import AugmentConfig
from stages.student.encoder import min_input_size
from stages.student.losses import LossConfig
from stages.student.model import StudentConfig
from stages.student.protocol import PROTOCOLS


@dataclass
class TrainConfig:
    """The `train` group of params.yaml (plus the dataset it trains on)."""

    dataset: str = DEFAULT_DATASET
    root: str | None = None
    cache: str | None = None  # default cache/<dataset>.zarr
    out: str | None = None  # default runs/<dataset>
    modalities: list[str] | None = None  # default: those in the cache
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 4  # the global batch
    crop: int = 128
    lr: float = 1e-3  # random init on the sample; the paper's 6e-5 assumes ImageNet MiT
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the steps
    warmup_ratio: float = 0.1  # warm-up starts at lr * warmup_ratio
    power: float = 0.9
    seed: int = 3407
    workers: int = 2
    modality_dropout: float = 0.0
    single_modality: bool = False  # every training sample shows exactly one modality
    augment: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    val_every: int = 100  # 0: only after the last step
    val_limit: int | None = 8  # None: the whole val split
    val_protocol: str | None = None  # None: the dataset's own, as `pipeline evaluate` scores
    checkpoint_every: int = 50
    device: str = "auto"
    skip_bad: bool = False
    dtype: str = "float32"  # float64: a reference run (numerical checks), not for speed
    nproc: int = 1  # processes (GPUs) on this machine; `pipeline train` launches them
    compile: bool = False  # torch.compile the model
    persistent_workers: bool = False  # keep the validation loader's workers between runs
    prefetch_factor: int | None = None  # batches each loader worker prepares ahead

    @classmethod
    def from_params(cls, params: dict[str, Any], overrides: dict[str, Any],
                    source: str = "params.yaml", flags: dict[str, str] | None = None
                    ) -> tuple[StudentConfig, TrainConfig]:
        """Defaults, then params.yaml (`dataset.name/root`, `student.*`, `train.*`), then the
        command line's `overrides`; `flags` names the flag of each overridden field so that
        an error names what the user typed."""
        data = dict(params.get("train") or {})
        ds = params.get("dataset") or {}
        for key, name in (("dataset", "name"), ("root", "root")):
            if name in ds:
                data.setdefault(key, ds[name])
        cfg = build(cls, data, Where("train", source))
        student = build(StudentConfig, dict(params.get("student") or {}),
                        Where("student", source))
        apply_overrides(overrides, cfg, student)
        flags = flags or {}
        student.validate(Where("student", source, flags))
        cfg.validate(Where("train", source, flags), student)
        return student, cfg

    def validate(self, where: Where | None = None,
                 student: StudentConfig | None = None) -> None:
        """Every value in range before anything is loaded, and (given the student) what
        the student's settings rule out; errors name the key (or flag)."""
        w = where or Where("train", None)
        backbone = student.backbone if student is not None else None
        if self.steps is None and self.epochs is None:
            raise PipelineError("set train.steps or train.epochs (or --steps / --epochs)")
        if self.steps is not None:
            w.integer("steps", self.steps, 1, why="optimiser steps")
        if self.epochs is not None:
            w.number("epochs", self.epochs, 0, lo_open=True, why="passes over the train split")
        w.integer("batch_size", self.batch_size, 1)
        smallest = min_input_size(backbone) if backbone else None
        w.integer("crop", self.crop, smallest or 1,
                  why=f"the smallest input {backbone} accepts; it need not be a multiple "
                  "of 32" if smallest else "")
        w.number("lr", self.lr, 0, lo_open=True)
        w.number("weight_decay", self.weight_decay, 0)
        w.number("warmup", self.warmup, 0, 1, hi_open=True, why="a fraction of the steps")
        w.number("warmup_ratio", self.warmup_ratio, 0, 1, why="warm-up starts at lr * ratio")
        w.number("power", self.power, 0, why="the poly schedule's exponent")
        w.integer("seed", self.seed, 0, 2 ** 32 - 1, why="numpy's seed range")
        w.integer("workers", self.workers, 0, why="0 loads in the training process")
        w.number("modality_dropout", self.modality_dropout, 0, 1, why="a probability")
        if not isinstance(self.single_modality, bool):
            w.fail("single_modality", "true or false", self.single_modality)
        if self.single_modality and self.modality_dropout:
            w.fail("modality_dropout", "0 with train.single_modality: true (that already "
                   "shows one modality per sample)", self.modality_dropout)
        w.integer("val_every", self.val_every, 0, why="0 validates only after the last step")
        if self.val_limit is not None:
            w.integer("val_limit", self.val_limit, 1,
                      why="leave it unset (null) for the whole val split")
        if self.val_protocol is not None:
            w.one_of("val_protocol", self.val_protocol, PROTOCOLS)
        w.integer("checkpoint_every", self.checkpoint_every, 1)
        w.integer("nproc", self.nproc, 1, why="processes (GPUs) on this machine")
        w.one_of("dtype", self.dtype, ("float32", "float64"))
        if self.prefetch_factor is not None:
            w.integer("prefetch_factor", self.prefetch_factor, 1,
                      why="batches each loader worker prepares ahead; null for torch's 2")
        if not is_device(self.device):
            w.fail("device", "one of " + ", ".join(DEVICE_FORMS), self.device)
        if self.modalities is not None:
            known = datasets.get(self.dataset).modalities
            unknown = [m for m in self.modalities if m not in known]
            if unknown:
                raise PipelineError(f"{w.key('modalities')} names unknown modality "
                                    f"{unknown[0]!r}; {self.dataset} has {', '.join(known)}")
            if not self.modalities or len(set(self.modalities)) < len(self.modalities):
                w.fail("modalities", "distinct modality names", self.modalities)
        loss = self.loss_config(w.sub("loss"))
        self.augment_config(w.sub("augment"))
        if student is not None and student.mff_config().variant == "author" and \
                loss.se_features == "decoder":
            raise PipelineError(f"{w.sub('loss').key('se_features')}: decoder needs MFF "
                                "before the head; under student.mff.variant author f_ma is "
                                "the fused class-score map: use fused")

    def settings(self) -> dict[str, Any]:
        """What decides the weights (a resumed run must match): not how many processes
        or loader workers compute them."""
        run_only = ("nproc", "workers", "persistent_workers", "prefetch_factor")
        return {k: v for k, v in asdict(self).items() if k not in run_only}

    def loss_config(self, where: Where | None = None) -> LossConfig:
        where = where or Where("train.loss", None)
        cfg = build(LossConfig, self.loss, where)
        cfg.validate(where)
        return cfg

    def augment_config(self, where: Where | None = None) -> AugmentConfig:
        where = where or Where("train.augment", None)
        cfg = build(AugmentConfig, self.augment, where)
        cfg.validate(where)
        return cfg

    def resolved_root(self) -> Path:
        return dataset_root(self.dataset, self.root)

    def resolved_cache(self) -> Path:
        return Path(self.cache or f"cache/{self.dataset}.zarr")

    def resolved_out(self) -> Path:
        return Path(self.out or f"runs/{self.dataset}")
