"""The Any2Seg student: one shared encoder, MFF at every stage, an all-MLP head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.student.encoder import Encoder
from stages.student.head import AllMLPHead
from stages.student.mff import MFF, MFFConfig, MFFOutput

MISSING_MODES = ("exclude", "zero-fill")


@dataclass
class StudentOutput:
    logits: torch.Tensor  # (B, K, H/4, W/4)
    feats: list[torch.Tensor]  # per stage (B, M, C, h, w), zeros for absent modalities
    fused: list[MFFOutput]  # per stage
    present: torch.Tensor  # (B, M) the mask MFF used


class Any2Seg(nn.Module):
    """Modalities are stacked on the batch axis and encoded in one pass by the shared
    encoder (absent ones are not encoded at all), fused per stage by MFF and decoded.

    `missing="exclude"` leaves absent modalities out of the fusion; `"zero-fill"` feeds
    them as all-zero tensors and fuses them like the others (the paper's MISS protocol).
    """

    def __init__(self, encoder: Encoder, modalities: list[str], num_classes: int,
                 mff: MFFConfig | None = None, embed_dim: int = 256, dropout: float = 0.1,
                 missing: str = "exclude") -> None:
        super().__init__()
        if missing not in MISSING_MODES:
            raise ValueError(f"missing must be one of {MISSING_MODES}, got {missing!r}")
        self.encoder = encoder
        self.modalities = list(modalities)
        self.num_classes = num_classes
        self.missing = missing
        self.mff = MFF(mff)
        self.head = AllMLPHead(encoder.channels, num_classes, embed_dim, dropout)

    def forward(self, images: torch.Tensor, present: torch.Tensor | None = None) -> StudentOutput:
        """images (B, M, 3, H, W) normalised; present (B, M) bool (default: all)."""
        b, m = images.shape[:2]
        if m != len(self.modalities):
            raise ValueError(f"expected {len(self.modalities)} modalities, got {m}")
        if present is None:
            present = torch.ones(b, m, dtype=torch.bool, device=images.device)
        if self.missing == "zero-fill":
            images = images * present[:, :, None, None, None].to(images.dtype)
            present = torch.ones_like(present)
        flat = images.flatten(0, 1)
        keep = present.flatten().nonzero().squeeze(1)
        stages = self.encoder(flat[keep])
        feats = []
        for f in stages:
            full = f.new_zeros((b * m, *f.shape[1:]))
            full[keep] = f
            feats.append(full.view(b, m, *f.shape[1:]))
        fused = [self.mff(f, present) for f in feats]
        logits = self.head([o.fused for o in fused])
        return StudentOutput(logits, feats, fused, present)
