"""MFF: modality-agnostic feature fusion (Any2Seg section 3.3), applied at every stage.

    f_ma^0 = mean of present modalities
    for t in 1..T:
        w_m  = cos(f_m, f_ma^{t-1})            per pixel        (re-weighting)
        f_mb = mean_m(w_m * f_m)
        C_m  = cos(f_m, f_mb);  M_I = argmax_m C_m              (selection)
        f_ms = f_m at M_I, per pixel
        f_ma^t = f_mb + f_ms                                    (residual)

Absent modalities are excluded from the mean and the selection (their features have no
influence and receive no gradient). Each part can be switched off for the paper's
Table 6 ablation; with all off MFF is a plain mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import Where


@dataclass
class MFFConfig:
    """The `student.mff` group of params.yaml."""

    reweight: bool = True
    select: bool = True
    residual: bool = True
    iterations: int = 1

    def validate(self, where: Where | None = None) -> None:
        where = where or Where("student.mff", None)
        where.integer("iterations", self.iterations, 1, why="refinements of f_ma")


@dataclass
class MFFOutput:
    fused: torch.Tensor  # (B, C, H, W)
    mean: torch.Tensor  # f_ma^0
    reweighted: torch.Tensor | None  # f_mb of the last iteration
    selected: torch.Tensor | None  # (B, H, W) index of the chosen modality


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine over channels: (B, M, C, H, W) x (B, 1, C, H, W) -> (B, M, H, W)."""
    return F.cosine_similarity(a, b, dim=2, eps=1e-6)


class MFF(nn.Module):
    """Parameter-free fusion of (B, M, C, H, W) features under a (B, M) presence mask."""

    def __init__(self, config: MFFConfig | None = None) -> None:
        super().__init__()
        self.config = config or MFFConfig()
        if self.config.iterations < 1:
            raise ValueError("MFF needs at least one iteration")

    def forward(self, feats: torch.Tensor, present: torch.Tensor) -> MFFOutput:
        cfg = self.config
        mask = present.to(feats.dtype)[:, :, None, None, None]
        if bool((present.sum(1) == 0).any()):
            raise ValueError("every sample needs at least one present modality")
        feats = feats * mask  # absent modalities: zero, and zero gradient
        count = mask.sum(1)
        mean = feats.sum(1) / count
        fused, reweighted, selected = mean, None, None
        if not (cfg.reweight or cfg.select):
            return MFFOutput(mean, mean, None, None)
        for _ in range(cfg.iterations):
            if cfg.reweight:
                w = _cos(feats, fused[:, None])[:, :, None]
                reweighted = (w * feats * mask).sum(1) / count
            else:
                reweighted = mean
            if cfg.select:
                score = _cos(feats, reweighted[:, None])
                score = score.masked_fill(~present[:, :, None, None], float("-inf"))
                selected = score.argmax(1)
                index = selected[:, None, None].expand(-1, 1, feats.shape[2], -1, -1)
                chosen = feats.gather(1, index)[:, 0]
                fused = reweighted + chosen if cfg.residual else chosen
            else:
                fused = reweighted
        return MFFOutput(fused, mean, reweighted, selected)
