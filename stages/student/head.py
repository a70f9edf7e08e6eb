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
        """The fused stride-4 features before dropout and the classifier: (B, E, H/4, W/4).

        Without autograd (inference) the upsampled projections are written straight into
        the fuse conv's input and each is freed at once, and that input is freed before
        the norm: 5 stride-4 maps of E channels alive at most instead of 10 (4 upsampled,
        their concatenation, the conv's and the norm's outputs), the same numbers (the
        same ops on the same values). A graph being exported sums the fuse conv over
        the stages instead (`_summed`); training keeps the plain concatenation."""
        if torch.compiler.is_exporting():
            return self._summed(feats)
        if torch.is_grad_enabled():
            size = feats[0].shape[-2:]
            up = [self._upsampled(i, f, size) for i, f in enumerate(feats)]
            return self.fuse(torch.cat(up[::-1], dim=1))
        conv, *rest = self.fuse
        return self._tail(rest, conv(self._concat(feats)))

    def _concat(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """`cat(upsampled projections, deepest first)` built in place: the stride-4 stage
        (the only one projected at full size) first, so its projection is freed before
        the (B, 4E, H/4, W/4) buffer exists."""
        size = feats[0].shape[-2:]
        n = len(feats)
        first = self._upsampled(0, feats[0], size)
        e = first.shape[1]
        out = first.new_empty((first.shape[0], e * n, *size))
        out[:, (n - 1) * e:].copy_(first)
        del first
        for i in range(1, n):
            j = n - 1 - i  # position in the deepest-first concatenation
            out[:, j * e:(j + 1) * e].copy_(self._upsampled(i, feats[i], size))
        return out

    def _upsampled(self, i: int, f: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Stage i's projection, bilinearly brought to the stride-4 size."""
        return F.interpolate(self.project[i](f), size=size, mode="bilinear",
                             align_corners=False)

    def _summed(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """decode as an exported graph runs it: the fuse conv (1x1, no bias) is linear in
        its input channels, so conv(cat(up_3, .., up_0)) = sum_i conv_i(up_i) with conv_i
        the weight's slice for stage i. ONNX Runtime then holds a running sum and one
        upsampled map instead of four and their concatenation (an out-of-place graph
        cannot build the concatenation in place). Only the float32 summation order
        differs from eager; export's parity check bounds that."""
        size = feats[0].shape[-2:]
        n = len(feats)
        weight = self.fuse[0].weight
        e = weight.shape[1] // n
        total = None
        for i, f in enumerate(feats):
            j = n - 1 - i  # position in the deepest-first concatenation
            part = F.conv2d(self._upsampled(i, f, size), weight[:, j * e:(j + 1) * e])
            total = part if total is None else total + part
        return self._tail(list(self.fuse)[1:], total)

    @staticmethod
    def _tail(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
        """The fuse block after its conv, on a tensor nothing else holds."""
        for module in modules:
            x = module(x)
        return x

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Class scores (B, K, H/4, W/4). CPU inference decodes one row (sample or
        modality) at a time: the stride-4 maps of E channels then exist for one row, not
        for all (mit_b2's head at 1024 px: 0.2 GB per map and row). Every op of the head
        works per row, and on the CPU a row's numbers do not depend on the batch around it
        (tests/student/test_inference_memory.py checks bit equality with the batched
        head); other devices and training keep the batch (their kernels may pick other
        algorithms per batch size)."""
        rows = feats[0].shape[0]
        if rows == 1 or torch.is_grad_enabled() or torch.compiler.is_exporting() \
                or feats[0].device.type != "cpu":
            return self.classify(self.dropout(self.decode(feats)))
        return torch.cat([self.classify(self.dropout(self.decode([f[i:i + 1] for f in feats])))
                          for i in range(rows)])
