"""The Any2Seg student: one shared encoder, MFF, an all-MLP head.

Where MFF sits depends on `student.mff.variant`: `pixel` and `paper` fuse the encoder
features at every stage and the head decodes the fused features (the paper's text);
`author` decodes every modality with the shared head and fuses the per-modality
class-score maps once (the authors' code, see stages/student/mff.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from any2seg.config import Where, build
from stages.student.data import black
from stages.student.encoder import Encoder, backbone_names, is_backbone
from stages.student.head import AllMLPHead
from stages.student.mff import MFF, MFFConfig, MFFOutput
from stages.student.noise import current, make_keyed, row_keys, using

MISSING_MODES = ("exclude", "zero-fill", "black")


@dataclass
class StudentOutput:
    logits: torch.Tensor  # (B, K, H/4, W/4)
    feats: list[torch.Tensor]  # per stage (B, M, C, h, w), zeros for absent modalities
    fused: list[MFFOutput]  # per stage; `author`: one, on the class-score maps
    present: torch.Tensor  # (B, M) the mask MFF used
    decoded: torch.Tensor | None = None  # the head's stride-4 features (not under `author`)
    base_logits: torch.Tensor | None = None  # (B, K, H/4, W/4) when `with_base` (L_base)


class Any2Seg(nn.Module):
    """Modalities are stacked on the batch axis and encoded in one pass by the shared
    encoder (absent ones are not encoded at all), fused per stage by MFF and decoded.

    Absent modalities: `missing="exclude"` leaves them out of the fusion (this project's
    choice); `"black"` feeds a black frame through the normal preprocessing and fuses it
    like the others (MISS's protocol, which the paper's MISS tables follow: RGB becomes
    -mean/std after ImageNet normalisation, the others 0); `"zero-fill"` feeds zeros in
    normalised space (ImageNet-mean grey for RGB), as some robustness benchmarks do.
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
        # also the mean of the per-modality logits (L_base's prediction); free under
        # `author`, which decodes each modality anyway
        self.with_base = False

    def filler(self, like: torch.Tensor) -> torch.Tensor:
        """(1, M, 3, 1, 1) normalised value fed for an absent modality (black / zero-fill)."""
        if self.missing == "black":
            values = torch.stack([black(m) for m in self.modalities])
        else:
            values = torch.zeros(len(self.modalities), 3)
        return values.to(like)[None, :, :, None, None]

    def encode_all(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every modality through the shared encoder: per stage (B, M, C, h, w)."""
        b, m = images.shape[:2]
        return [f.view(b, m, *f.shape[1:]) for f in self.encoder(images.flatten(0, 1))]

    def decode(self, feats: list[torch.Tensor], present: torch.Tensor) -> torch.Tensor:
        """Fuse per-stage features under `present` and classify: (B, K, H/4, W/4)."""
        return self.fuse(feats, present)[0]

    def fuse(self, feats: list[torch.Tensor], present: torch.Tensor
             ) -> tuple[torch.Tensor, list[MFFOutput], torch.Tensor | None]:
        """Logits, the MFF outputs and the head's stride-4 features of the fused input,
        with MFF where the variant puts it."""
        if self.mff.config.variant == "author":
            fused = self.mff(self.modality_logits(feats, present), present)
            return fused.fused, [fused], None
        outputs = [self.mff(f, present) for f in feats]
        decoded = self.head.decode([o.fused for o in outputs])
        return self.head.classify(self.head.dropout(decoded)), outputs, decoded

    def base(self, feats: list[torch.Tensor], fused: list[MFFOutput],
             present: torch.Tensor) -> torch.Tensor | None:
        """L_base's prediction when `with_base` asks for it: the shared head on each present
        modality alone, averaged over the present ones (under `author` that is MFF's own
        anchor, the mean of the maps it fuses; else one more head pass)."""
        if not self.with_base:
            return None
        if self.mff.config.variant == "author":
            return fused[0].mean
        logits = self.modality_logits(feats, present)
        weight = present.to(logits.dtype)[:, :, None, None, None]
        return (logits * weight).sum(1) / weight.sum(1).clamp(min=1)

    def modality_logits(self, feats: list[torch.Tensor],
                        present: torch.Tensor) -> torch.Tensor:
        """The shared head on every present modality alone: (B, M, K, H/4, W/4), zeros
        for absent ones."""
        b, m = present.shape
        keys = current()  # the head sees (sample, modality) rows, as the encoder does
        exporting = torch.compiler.is_exporting()  # a graph: no data-dependent branch
        if exporting:  # one head call per modality slot: ONNX Runtime then holds the
            # head's stride-4 maps for one modality at a time, not for all of them at once
            out = torch.stack([self.head([f[:, j] for f in feats]) for j in range(m)], 1)
            return out * present[:, :, None, None, None].to(out.dtype)
        if bool(present.all()):  # nothing absent: no gather, no scatter
            with using(None if keys is None else row_keys(keys, m)):
                out = self.head([f.flatten(0, 1) for f in feats])
            return out.view(b, m, *out.shape[1:])
        keep = present.flatten().nonzero().squeeze(1)
        with using(None if keys is None else row_keys(keys, m)[keep]):
            out = self.head([f.flatten(0, 1)[keep] for f in feats])
        full = out.new_zeros((b * m, *out.shape[1:]))
        full[keep] = out
        return full.view(b, m, *out.shape[1:])

    def forward(self, images: torch.Tensor, present: torch.Tensor | None = None) -> StudentOutput:
        """images (B, M, 3, H, W) normalised; present (B, M) bool (default: all)."""
        b, m = images.shape[:2]
        if m != len(self.modalities):
            raise ValueError(f"expected {len(self.modalities)} modalities, got {m}")
        if present is None:
            present = torch.ones(b, m, dtype=torch.bool, device=images.device)
        if self.missing != "exclude":
            images = torch.where(present[:, :, None, None, None], images, self.filler(images))
            present = torch.ones_like(present)
        flat = images.flatten(0, 1)
        keys = current()  # per-sample noise keys (training): per (sample, modality) rows
        if bool(present.all()):  # nothing absent: the encoder's features as they are
            with using(None if keys is None else row_keys(keys, m)):
                stages = self.encoder(flat)
            feats = [f.view(b, m, *f.shape[1:]) for f in stages]
            logits, fused, decoded = self.fuse(feats, present)
            return StudentOutput(logits, feats, fused, present, decoded,
                                 self.base(feats, fused, present))
        keep = present.flatten().nonzero().squeeze(1)
        with using(None if keys is None else row_keys(keys, m)[keep]):
            stages = self.encoder(flat[keep])
        feats = []
        for f in stages:
            full = f.new_zeros((b * m, *f.shape[1:]))
            full[keep] = f
            feats.append(full.view(b, m, *f.shape[1:]))
        logits, fused, decoded = self.fuse(feats, present)
        return StudentOutput(logits, feats, fused, present, decoded,
                             self.base(feats, fused, present))


@dataclass
class StudentConfig:
    """The `student` group of params.yaml."""

    backbone: str = "mit_b0"
    pretrained: str | None = None
    embed_dim: int = 128  # SegFormer: 256 for b0/b1, 768 for b2+; 128 suits the sample
    dropout: float = 0.1
    mff: dict[str, Any] = field(default_factory=dict)  # MFFConfig fields
    missing: str = "exclude"

    def validate(self, where: Where | None = None) -> None:
        where = where or Where("student", None)
        if not is_backbone(self.backbone):
            where.fail("backbone", "one of " + ", ".join(backbone_names()), self.backbone)
        where.integer("embed_dim", self.embed_dim, 1, why="the all-MLP head's width")
        where.number("dropout", self.dropout, 0, 1, hi_open=True, why="a probability")
        where.one_of("missing", self.missing, MISSING_MODES)
        self.mff_config(where.sub("mff"))

    def mff_config(self, where: Where | None = None) -> MFFConfig:
        where = where or Where("student.mff", None)
        cfg = build(MFFConfig, self.mff, where)
        cfg.validate(where)
        return cfg


def build_student(cfg: StudentConfig, modalities: list[str], num_classes: int) -> Any2Seg:
    from stages.student.encoder import build_encoder

    cfg.validate()
    # dropout and drop-path masks from per-sample keys (stages.student.noise)
    return make_keyed(Any2Seg(build_encoder(cfg.backbone, cfg.pretrained), modalities,
                              num_classes, cfg.mff_config(), cfg.embed_dim, cfg.dropout,
                              cfg.missing))
