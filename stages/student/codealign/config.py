"""The `codealign` group of params.yaml: every tunable of the three CodeAlign stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from any2seg.config import Where, build
from any2seg.errors import PipelineError

SPLITS = ("dealt", "all")                    # see split.py
OPTIMISERS = ("adam", "adamw")
BACKENDS = ("random", "stage0", "fixed")     # stage 1 back-end of a multi-modality group
EVAL_QUANTISERS = ("gumbel", "argmax")


@dataclass
class CodeAlignConfig:
    """Defaults follow the official yamls (opencood/hypes_yaml/opv2v/Heter_group/codebook/:
    pyramid.yaml for stage 0, codebook_pyramid_fixenc_aligner_add_loss.yaml for stage 1,
    codebook_pyramid_c2c.yaml for stage 2): dict_size 16, seg_num 1, 4 aligner blocks, 3
    ConvNeXt blocks of width 64, Adam (eps 1e-10, L2 weight decay 1e-4), lr 2e-3 / 2e-3 /
    1e-3 with x0.1 at 30 % and 60 % (stages 0, 1: epochs 15, 30 of 50) or a third and two
    thirds (stage 2: 10, 20 of 30) of a stage, 0.1 x the intra-group l2, a stage-1 back-end
    trained from random initialisation, Gumbel sampling in the quantiser at evaluation too.
    Step budgets are sample-sized. docs/codealign.md names the file of every value."""

    groups: list[list[str]] = field(default_factory=lambda: [["rgb", "depth"],
                                                             ["event", "lidar"]])
    seed: int = 0               # the scene -> group assignment
    split: str = "dealt"        # dealt: a group sees its scenes only; all: every scene
    codes: int = 16             # K, codewords per group code space
    temperature: float = 1.0    # init of the learnable logit temperature
    gumbel_tau: float = 1.0     # Gumbel-softmax temperature (official: 1.0)
    aligner_blocks: int = 4
    translator_dim: int = 64
    translator_blocks: int = 3
    w_intra: float = 0.1        # official l2 between decoded features inside a group
    stage1_backend: str = "random"  # multi-modality group's MFF + head in stage 1
    stage0_steps: int = 150
    stage1_steps: int = 60
    stage2_steps: int = 60
    batch_size: int = 4
    crop: int = 64
    optimizer: str = "adam"     # adam: L2 weight decay in the gradient (torch.optim.Adam)
    eps: float = 1e-10
    weight_decay: float = 1e-4
    stage0_lr: float = 0.002
    stage1_lr: float = 0.002
    stage2_lr: float = 0.001
    lr_gamma: float = 0.1       # multistep: lr x gamma at each milestone
    stage0_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6])
    stage1_milestones: list[float] = field(default_factory=lambda: [0.3, 0.6])
    stage2_milestones: list[float] = field(default_factory=lambda: [1 / 3, 2 / 3])
    eval_quantiser: str = "gumbel"  # a group's own code space at evaluation
    eval_seed: int = 0          # the Gumbel noise of the evaluation
    checkpoint_every: int = 25
    train_seed: int = 3407      # batches, augmentation, Gumbel noise, initialisation

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CodeAlignConfig:
        cfg = build(cls, dict(params.get("codealign") or {}), Where("codealign"))
        cfg.validate()
        return cfg

    def lr(self, stage: int) -> float:
        return float(getattr(self, f"stage{stage}_lr"))

    def milestones(self, stage: int, steps: int) -> list[int]:
        """The stage's milestones as optimiser steps of a `steps`-step run: the same
        fractions of the run as the official epochs are of its epoch count."""
        return [round(f * steps) for f in getattr(self, f"stage{stage}_milestones")]

    def validate(self, where: Where | None = None,
                 modalities: list[str] | None = None) -> None:
        where = where or Where("codealign")
        if len(self.groups) < 2 or any(not g for g in self.groups):
            where.fail("groups", "at least two non-empty lists of modalities", self.groups)
        flat = [m for g in self.groups for m in g]
        if len(set(flat)) != len(flat):
            where.fail("groups", "a partition (no modality in two groups)", self.groups)
        if modalities is not None:
            unknown = sorted(set(flat) - set(modalities))
            if unknown:
                raise PipelineError(f"{where.key('groups')} names {', '.join(unknown)}, "
                                    f"not modalities of the data set ({', '.join(modalities)})")
        where.integer("seed", self.seed, 0)
        where.one_of("split", self.split, SPLITS)
        where.integer("codes", self.codes, 2, why="codewords per code space")
        where.number("temperature", self.temperature, 0, lo_open=True)
        where.number("gumbel_tau", self.gumbel_tau, 0, lo_open=True)
        where.integer("aligner_blocks", self.aligner_blocks, 0)
        where.integer("translator_dim", self.translator_dim, 1)
        where.integer("translator_blocks", self.translator_blocks, 0)
        where.number("w_intra", self.w_intra, 0)
        where.one_of("stage1_backend", self.stage1_backend, BACKENDS)
        for name in ("stage0_steps", "stage1_steps", "stage2_steps"):
            where.integer(name, getattr(self, name), 1)
        where.integer("batch_size", self.batch_size, 1)
        where.integer("crop", self.crop, 32, why="the MiT encoder's smallest input")
        where.one_of("optimizer", self.optimizer, OPTIMISERS)
        where.number("eps", self.eps, 0, lo_open=True)
        where.number("weight_decay", self.weight_decay, 0)
        where.number("lr_gamma", self.lr_gamma, 0, lo_open=True)
        for stage in range(3):
            where.number(f"stage{stage}_lr", getattr(self, f"stage{stage}_lr"), 0,
                         lo_open=True)
            marks = getattr(self, f"stage{stage}_milestones")
            if not isinstance(marks, list) or any(
                    isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1
                    for f in marks) or marks != sorted(marks):
                where.fail(f"stage{stage}_milestones",
                           "an increasing list of fractions of the stage's steps in (0, 1)",
                           marks)
        where.one_of("eval_quantiser", self.eval_quantiser, EVAL_QUANTISERS)
        where.integer("eval_seed", self.eval_seed, 0)
        where.integer("checkpoint_every", self.checkpoint_every, 1)
        where.integer("train_seed", self.train_seed, 0)
