"""A modality's aligner: 4 residual 3x3 blocks at the feature width, as the official
`Res3x3Aligner` / `ResidualBlock` (opencood/models/sub_modules/feature_alignnet_modules.py,
`core_method: resnet3x3` in the yamls, mapped in feature_alignnet.py):
conv-BN-ReLU-conv-BN, identity skip, ReLU after the sum."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(dim), nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + x)


class Aligner(nn.Sequential):
    def __init__(self, dim: int, blocks: int = 4) -> None:
        super().__init__(*[ResidualBlock(dim) for _ in range(blocks)])
