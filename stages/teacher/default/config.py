"""`FitConfig`: the `teacher.fit` group of params.yaml (the embedded default teacher only),
with the bounds that keep a CPU fit finite."""

from __future__ import annotations

from dataclasses import dataclass

from any2seg.errors import PipelineError

# upper bounds of the fit's sizes: far above the default, below what exhausts a machine
FIT_LIMITS = {"hidden": 4096, "layers": 48, "heads": 64, "projection": 4096,
              "image_size": 1024, "batch_size": 4096, "lora_r": 1024, "image_lora_r": 1024,
              "threads": 1024}


@dataclass
class FitConfig:
    """The `teacher.fit` group of params.yaml (the embedded default only)."""

    seed: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    projection: int = 64
    image_size: int = 128
    patch: int = 16
    max_depth: float = 80.0  # metres; the sample's streets reach far beyond 10 m
    image_epochs: int = 40
    branch_epochs: int = 30
    batch_size: int = 16
    lr: float = 2e-3
    branch_lr: float = 5e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of each phase's steps
    region_weight: float = 1.0
    caption_views: float = 0.5  # share of captions cut to the opening + a random class subset
    lora_r: int = 8  # phase-2 branches
    lora_alpha: int = 16
    image_lora_r: int = 4  # the image branch is written with a LoRA split of this rank
    threads: int = 1  # fixed, so that the bytes do not depend on the machine; one thread
    # also keeps a shared CPU from thrashing (OpenMP threads spin on busy cores)

    def validate(self) -> None:
        for name in ("hidden", "layers", "heads", "projection", "image_size", "patch",
                     "batch_size", "lora_r", "image_lora_r", "threads"):
            if getattr(self, name) < 1:
                raise PipelineError(f"teacher.fit.{name} must be >= 1")
        for name, hi in FIT_LIMITS.items():  # a tiny CPU-fitted teacher: larger runs out of
            if getattr(self, name) > hi:  # memory (or years) before it finishes
                raise PipelineError(f"teacher.fit.{name} must be <= {hi} (the embedded "
                                    f"teacher is fitted on CPU), got {getattr(self, name)}")
        if self.image_epochs < 0 or self.branch_epochs < 0:
            raise PipelineError("teacher.fit.image_epochs and branch_epochs must be >= 0")
        if self.hidden % self.heads:
            raise PipelineError("teacher.fit.hidden must be a multiple of teacher.fit.heads")
        if self.image_size % self.patch:
            raise PipelineError("teacher.fit.image_size must be a multiple of "
                                "teacher.fit.patch")
        if not (self.lr > 0 and self.branch_lr > 0 and 0 <= self.warmup < 1):
            raise PipelineError("teacher.fit.lr and branch_lr must be > 0, warmup in [0, 1)")
        if not 0 <= self.caption_views <= 1:
            raise PipelineError("teacher.fit.caption_views must be in [0, 1]")
