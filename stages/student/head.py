"""SegFormer's all-MLP decoder on the fused multi-scale features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AllMLPHead(nn.Module):
    """Project every stage to `embed_dim`, upsample to stride 4, fuse, classify."""

    def __init__(self, in_channels: list[int], num_classes: int, embed_dim: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(in_channels), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classify = nn.Conv2d(embed_dim, num_classes, 1)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """The fused stride-4 features before dropout and the classifier: (B, E, H/4, W/4)."""
        size = feats[0].shape[-2:]
        up = [F.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
              for p, f in zip(self.project, feats, strict=True)]
        return self.fuse(torch.cat(up[::-1], dim=1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.dropout(self.decode(feats)))
