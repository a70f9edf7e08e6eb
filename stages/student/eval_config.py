"""`EvalConfig`: the `eval` group of params.yaml (what `pipeline evaluate` scores and how),
checked before a checkpoint is loaded; beside `TrainConfig` (`config`) but its own module,
so that what imports the evaluation does not import the training settings and losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from any2seg.config import Where, apply_overrides, build
from stages.student.model import MISSING_MODES
from stages.student.protocol import PROTOCOLS, default_missing, default_protocol

SETTINGS = ("mss", "miss", "sensor")  # what `pipeline evaluate --setting` scores (or all)
INFERENCE_MODES = ("whole", "slide")


@dataclass
class EvalConfig:
    """The `eval` group of params.yaml."""

    split: str = "val"
    setting: str = "all"
    protocol: str | None = None  # official or native; None: the dataset's default
    mode: str = "whole"
    crop: int = 1024
    stride: int = 683
    missing: str | None = None  # None: black under official, else the checkpoint's
    limit: int | None = None
    examples: int = 4
    nproc: int = 1  # processes on this machine, each scoring a share of the samples

    @classmethod
    def from_params(cls, params: dict[str, Any], overrides: dict[str, Any],
                    source: str = "params.yaml", flags: dict[str, str] | None = None
                    ) -> tuple[EvalConfig, Where]:
        """Defaults, then params.yaml's `eval` group, then the command line's `overrides`;
        returns the config and the `Where` that names each value as the user set it."""
        cfg = build(cls, dict(params.get("eval") or {}), Where("eval", source))
        apply_overrides(overrides, cfg)
        where = Where("eval", source, flags)
        cfg.validate(where)
        return cfg, where

    def validate(self, where: Where | None = None) -> None:
        w = where or Where("eval", None)
        w.integer("nproc", self.nproc, 1, why="processes, each scoring a share of the samples")
        if not self.split:
            w.fail("split", "a split name such as val", self.split)
        w.one_of("setting", self.setting, (*SETTINGS, "all"))
        if self.protocol is not None:
            w.one_of("protocol", self.protocol, PROTOCOLS)
        w.one_of("mode", self.mode, INFERENCE_MODES)
        w.integer("crop", self.crop, 1, why="the sliding window's side")
        w.integer("stride", self.stride, 1, self.crop,
                  why="larger than eval.crop would leave pixels between windows unseen")
        if self.missing is not None:
            w.one_of("missing", self.missing, MISSING_MODES)
        if self.limit is not None:
            w.integer("limit", self.limit, 1, why="leave it unset (null) for the whole split")
        w.integer("examples", self.examples, 0, why="samples drawn in predictions.png")

    @property
    def settings(self) -> tuple[str, ...]:
        return SETTINGS if self.setting == "all" else (self.setting,)

    def resolved_protocol(self, dataset: str) -> str:
        return self.protocol or default_protocol(dataset)

    def resolved_missing(self, dataset: str, checkpoint_missing: str) -> str:
        return (self.missing or default_missing(self.resolved_protocol(dataset))
                or checkpoint_missing)
