"""Backbones for the student: anything that maps (N, 3, H, W) to four feature maps.

The student shares one encoder across modalities, so it only needs `forward(x) ->
[f1, f2, f3, f4]` at strides 4, 8, 16, 32 and `channels`. Two kinds ship: SegFormer MiT
B0-B5 (`mit_b2`; the project's own MiT in stages/student/mit.py, equal to transformers'
`SegformerModel`) and any timm `features_only` model (`timm:resnet50`); `register` adds
more.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from any2seg.errors import PipelineError
from stages.student.mit import MIT, MIT_PATCHES, MIT_SR_RATIOS, MiT, MiTConfig, mit_min_input

__all__ = ["MIT", "MIT_PATCHES", "MIT_SR_RATIOS", "Encoder", "SegformerEncoder", "TimmEncoder",
           "backbone_names", "build_encoder", "is_backbone", "min_input_size", "mit_min_input",
           "register"]

def min_input_size(backbone: str) -> int | None:
    """The smallest input side `backbone` accepts, when it is known without building it."""
    if backbone.startswith("mit_"):
        return mit_min_input()
    return None


def backbone_names() -> list[str]:
    """What `student.backbone` / `--variant` accept, for help texts and errors."""
    return [name for prefix in _BACKBONES for name in _NAMES.get(prefix, [f"{prefix}NAME"])]


class Encoder(nn.Module, ABC):
    """Interface: four feature maps at strides 4..32 with `channels` channels."""

    channels: list[int]
    min_side: int | None = None  # the smallest input side it accepts, where known

    @abstractmethod
    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> [(N, C1, H/4, W/4), ..., (N, C4, H/32, W/32)]."""


class SegformerEncoder(Encoder):
    """SegFormer's MiT (stages.student.mit), random or from a local nvidia/mit-bN folder.

    `self.model` holds it under transformers' `SegformerModel` names, as checkpoints
    saved when this wrapped transformers' model expect; transformers is not imported."""

    def __init__(self, variant: str = "b0", pretrained: str | Path | None = None,
                 drop_path_rate: float = 0.1) -> None:
        super().__init__()
        if variant not in MIT:
            raise PipelineError(f"unknown MiT variant {variant!r}; variants: {', '.join(MIT)}")
        if pretrained:
            from stages.student.mit_pretrained import load_pretrained_mit

            self.model = load_pretrained_mit(pretrained, variant, drop_path_rate)
        else:
            self.model = MiT(MiTConfig.variant(variant, drop_path_rate))
        self.channels = list(self.model.config.hidden_sizes)
        self.min_side = self.model.config.min_side()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if min(x.shape[-2:]) < self.min_side:  # else a shape error deep inside MiT
            raise PipelineError(f"an input of {x.shape[-1]}x{x.shape[-2]} px is smaller than "
                                f"MiT accepts ({self.min_side} px on each side)")
        return self.model(x)


class TimmEncoder(Encoder):
    """Any timm model with `features_only=True`; the last four feature levels are used."""

    def __init__(self, name: str, pretrained: str | Path | None = None) -> None:
        super().__init__()
        import timm

        try:
            self.model = timm.create_model(name, features_only=True, pretrained=False)
        except RuntimeError as exc:
            raise PipelineError(f"timm cannot build {name!r} with features_only ({exc})") from exc
        if pretrained:
            path = Path(pretrained)
            if not path.is_file():
                raise PipelineError(f"timm weights file {path} does not exist")
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, _ = self.model.load_state_dict(state, strict=False)
            if missing:
                raise PipelineError(f"{path} misses {len(missing)} keys of {name} "
                                    f"(e.g. {missing[0]})")
        channels = list(self.model.feature_info.channels())
        if len(channels) < 4:
            raise PipelineError(f"timm:{name} gives {len(channels)} feature levels; the "
                                "student needs 4")
        self.channels = channels[-4:]  # the last four levels (strides 4..32 for most models)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.model(x))[-4:]


_BACKBONES: dict[str, Callable[..., Encoder]] = {}
_NAMES: dict[str, list[str]] = {}


def register(prefix: str, names: list[str] | None = None
             ) -> Callable[[Callable[..., Encoder]], Callable[..., Encoder]]:
    """Register a factory `f(name, pretrained) -> Encoder` for names starting with `prefix`;
    `names` lists them for help texts (default `PREFIXNAME`)."""
    def wrap(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        _BACKBONES[prefix] = factory
        if names is not None:
            _NAMES[prefix] = list(names)
        return factory
    return wrap


def is_backbone(name: str) -> bool:
    """Whether `name` is a registered backbone (a MiT variant must exist)."""
    if name.startswith("mit_"):
        return name.removeprefix("mit_") in MIT
    return any(name.startswith(prefix) and len(name) > len(prefix) for prefix in _BACKBONES)


@register("mit_", [f"mit_{v}" for v in MIT])
def _mit(name: str, pretrained: str | None = None) -> Encoder:
    return SegformerEncoder(name.removeprefix("mit_"), pretrained)


@register("timm:")
def _timm(name: str, pretrained: str | None = None) -> Encoder:
    return TimmEncoder(name.removeprefix("timm:"), pretrained)


def build_encoder(name: str, pretrained: str | None = None) -> Encoder:
    """`mit_b0`..`mit_b5`, `timm:<model>`, or a registered prefix."""
    for prefix, factory in _BACKBONES.items():
        if name.startswith(prefix):
            return factory(name, pretrained)
    raise PipelineError(f"unknown backbone {name!r}; one of {', '.join(backbone_names())}")
