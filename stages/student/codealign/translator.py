"""FCF translation: a source modality's aligned features -> a target group's code logits,
as the official `TranslatorConvNext` (opencood/models/c2c_module.py): 1x1 conv to the
hidden width, ConvNeXt blocks (depthwise 7x7, LayerNorm, 4x MLP with GELU, layer scale
1e-6, residual; feature_alignnet_modules.py `ConvNeXtBlock`), 1x1 conv to K logits. No
resize: source and target cells are pixel-aligned here (no BEV ranges)."""

from __future__ import annotations

import torch
from torch import nn


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, kernel: int = 7, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.act = nn.GELU()
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class Translator(nn.Module):
    """(B, C, h, w) source features -> (B, h, w, K) logits over the target's codes."""

    def __init__(self, in_dim: int, codes: int, dim: int = 64, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Conv2d(in_dim, dim, 1)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim) for _ in range(blocks)])
        self.out = nn.Conv2d(dim, codes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x))).permute(0, 2, 3, 1)
