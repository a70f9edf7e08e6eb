"""MFF: modality-agnostic feature fusion (Any2Seg section 3.3), in three variants.

The paper's text and the authors' own code (their DELIVER fork, compiled modules of
February 2024 in github:zhengxuJosh/AnySeg, `semseg/models/segformer/modal_seg.py`)
disagree, so `variant` picks one:

    pixel   (this project's first reading; on encoder features at every stage)
        f_ma^0 = mean_m f_m
        w_m    = cos(f_m, f_ma^{t-1})            per pixel, over channels
        f_mb   = mean_m (w_m * f_m)
        f_ms   = f_m at argmax_m cos(f_m, f_mb)   per pixel
        f_ma^t = f_mb + f_ms

    paper   (the text: encoder features, then the head; "multiplied ... then averaged")
        as `pixel`, but w_m = cos(flatten(f_m), flatten(f_ma^{t-1})), one scalar per
        sample and modality

    author  (modal_seg.py: on the per-modality class-score maps after the shared head)
        anchor = mean_m f_m, or (f_ma^{t-1} + mean_m f_m) / 2 from the second iteration
        w_m    = cos(flatten(f_m), flatten(anchor))    one scalar per sample and modality
        f_mb   = sum_m (w_m * f_m)                     a weighted sum
        f_ms   = f_m at argmax_m cos(f_m, f_mb)         per pixel
        f_ma^t = f_ms + mean_m f_m

Absent modalities (`present` False) are excluded from every mean, sum and argmax: their
features have no influence and receive no gradient. (The recovered code leaves event out
of the selection candidates and of the final mean; that slip is not reproduced: every
present modality is a candidate.) `reweight`, `select` and `residual` switch the parts
for the paper's Table 6: without re-weighting w_m = 1; without selection f_mb (for
`author` the re-weighted sum divided by the number of present modalities) takes the place
of f_ms; without the residual the second term is dropped; with neither re-weighting nor
selection MFF is the plain mean. `correlation` is the (B, M) global cosine of the last
iteration (`author`, `paper`): the student side of L_cr under `author`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from any2seg.config import Where

VARIANTS = ("author", "paper", "pixel")


@dataclass
class MFFConfig:
    """The `student.mff` group of params.yaml."""

    variant: str = "pixel"
    reweight: bool = True
    select: bool = True
    residual: bool = True
    iterations: int = 1

    def validate(self, where: Where | None = None) -> None:
        where = where or Where("student.mff", None)
        where.one_of("variant", self.variant, VARIANTS)
        where.integer("iterations", self.iterations, 1, why="refinements of f_ma")


@dataclass
class MFFOutput:
    fused: torch.Tensor  # (B, C, H, W) f_ma
    mean: torch.Tensor  # mean of the present modalities
    reweighted: torch.Tensor | None  # f_mb of the last iteration
    selected: torch.Tensor | None  # (B, H, W) index of the chosen modality
    weights: torch.Tensor | None = None  # re-weighting: (B, M) global, (B, M, H, W) pixel
    correlation: torch.Tensor | None = None  # (B, M) global cosine to the anchor


def _pixel_cos(feats: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Cosine over channels: (B, M, C, H, W) x (B, C, H, W) -> (B, M, H, W)."""
    return F.cosine_similarity(feats, anchor[:, None], dim=2, eps=1e-6)


def _global_cos(feats: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Cosine of the flattened maps: (B, M, C, H, W) x (B, C, H, W) -> (B, M)."""
    return F.cosine_similarity(feats.flatten(2), anchor.flatten(1)[:, None], dim=2, eps=1e-6)


class MFF(nn.Module):
    """Parameter-free fusion of (B, M, C, H, W) features under a (B, M) presence mask."""

    def __init__(self, config: MFFConfig | None = None) -> None:
        super().__init__()
        self.config = config or MFFConfig()
        self.config.validate()

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> MFFOutput:
        cfg = self.config
        # a graph being exported has a fixed subset, so the check is the exporter's caller's
        if not torch.compiler.is_exporting() and bool((present.sum(1) == 0).any()):
            raise ValueError("every sample needs at least one present modality")
        mask = present.to(feats.dtype)[:, :, None, None, None]
        feats = feats * mask  # absent modalities: zero, and zero gradient
        count = mask.sum(1)
        mean = feats.sum(1) / count
        if not (cfg.reweight or cfg.select):
            corr = (_global_cos(feats, mean) * present if cfg.variant in ("author", "paper")
                    else None)
            return MFFOutput(mean, mean, None, None, None, corr)
        fused, reweighted, selected, weights, corr = mean, None, None, None, None
        for t in range(cfg.iterations):
            if cfg.variant == "author":
                anchor = mean if t == 0 else (fused + mean) / 2
            else:
                anchor = fused
            if cfg.variant in ("author", "paper"):
                corr = _global_cos(feats, anchor) * present
                weights = corr if cfg.reweight else present.to(feats.dtype)
                w = weights[:, :, None, None, None]
            else:
                weights = _pixel_cos(feats, anchor) if cfg.reweight else None
                w = weights[:, :, None] if weights is not None else 1.0
            total = (w * feats * mask).sum(1)
            reweighted = total if cfg.variant == "author" else total / count
            if cfg.select:
                score = _pixel_cos(feats, reweighted)
                score = score.masked_fill(~present[:, :, None, None], float("-inf"))
                selected = score.argmax(1)
                index = selected[:, None, None].expand(-1, 1, feats.shape[2], -1, -1)
                chosen = feats.gather(1, index)[:, 0]  # f_ms
            if cfg.variant == "author":
                first, second = (chosen if cfg.select else total / count), mean
            elif cfg.select:
                first, second = chosen, reweighted
            else:
                fused = reweighted
                continue
            fused = first + second if cfg.residual else first
        return MFFOutput(fused, mean, reweighted, selected, weights, corr)
