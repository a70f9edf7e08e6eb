"""The `codealign` group of params.yaml: every tunable of the three CodeAlign stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from any2seg.config import Where, build
from any2seg.errors import PipelineError


@dataclass
class CodeAlignConfig:
    """Defaults follow the official yamls (opencood/hypes_yaml/opv2v/Heter_group/codebook/):
    dict_size 16, seg_num 1, 4 aligner blocks, 3 ConvNeXt blocks of width 64, lr 0.002,
    weight decay 1e-4, 0.1 x the intra-group masked L2. Step budgets are sample-sized."""

    groups: list[list[str]] = field(default_factory=lambda: [["rgb", "depth"],
                                                             ["event", "lidar"]])
    seed: int = 0               # the scene -> group assignment
    codes: int = 16             # K, codewords per group code space
    temperature: float = 1.0    # init of the learnable logit temperature
    gumbel_tau: float = 1.0     # Gumbel-softmax temperature (official: 1.0)
    aligner_blocks: int = 4
    translator_dim: int = 64
    translator_blocks: int = 3
    w_intra: float = 0.1        # masked L2 between decoded features inside a group
    stage0_steps: int = 150
    stage1_steps: int = 60
    stage2_steps: int = 60
    batch_size: int = 4
    crop: int = 64
    lr: float = 0.002
    weight_decay: float = 1e-4
    checkpoint_every: int = 25
    train_seed: int = 3407      # batches, augmentation, Gumbel noise, initialisation

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> CodeAlignConfig:
        cfg = build(cls, dict(params.get("codealign") or {}), Where("codealign"))
        cfg.validate()
        return cfg

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
        where.integer("codes", self.codes, 2, why="codewords per code space")
        where.number("temperature", self.temperature, 0, lo_open=True)
        where.number("gumbel_tau", self.gumbel_tau, 0, lo_open=True)
        where.integer("aligner_blocks", self.aligner_blocks, 0)
        where.integer("translator_dim", self.translator_dim, 1)
        where.integer("translator_blocks", self.translator_blocks, 0)
        where.number("w_intra", self.w_intra, 0)
        for name in ("stage0_steps", "stage1_steps", "stage2_steps"):
            where.integer(name, getattr(self, name), 1)
        where.integer("batch_size", self.batch_size, 1)
        where.integer("crop", self.crop, 32, why="the MiT encoder's smallest input")
        where.number("lr", self.lr, 0, lo_open=True)
        where.number("weight_decay", self.weight_decay, 0)
        where.integer("checkpoint_every", self.checkpoint_every, 1)
        where.integer("train_seed", self.train_seed, 0)
