"""The CodeAlign system: one model per group (its own encoder, so no alignment leaks
between groups through shared weights), per-modality aligners and per-group code spaces
on the features MFF reads (every encoder stage), and translators between groups."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from stages.student.codealign.aligner import Aligner
from stages.student.codealign.config import CodeAlignConfig
from stages.student.codealign.quantiser import Quantiser, hard_gumbel, one_hot_argmax
from stages.student.codealign.translator import Translator
from stages.student.model import Any2Seg, StudentConfig, build_student


class GroupModel(nn.Module):
    def __init__(self, student: Any2Seg, cfg: CodeAlignConfig) -> None:
        super().__init__()
        self.student = student
        ch = student.encoder.channels
        self.aligners = nn.ModuleDict({m: nn.ModuleList(Aligner(c, cfg.aligner_blocks)
                                                        for c in ch)
                                       for m in student.modalities})
        self.quantisers = nn.ModuleList(Quantiser(c, cfg.codes, cfg.temperature,
                                                  cfg.gumbel_tau, cfg.eval_quantiser)
                                        for c in ch)

    def backend(self) -> list[nn.Module]:
        return [self.student.mff, self.student.head]

    def aligned(self, modality: str, image: torch.Tensor) -> list[torch.Tensor]:
        """One modality's (B, 3, H, W) input -> its aligned features per stage."""
        return [a(f) for a, f in zip(self.aligners[modality], self.student.encoder(image),
                                         strict=True)]

    def coded(self, images: torch.Tensor, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """All the group's modalities (B, M, 3, H, W) through aligner and code space:
        logits, decoded features per stage (B, M, C, h, w) and one-hot codes."""
        per_mod = [self.aligned(m, images[:, i])
                   for i, m in enumerate(self.student.modalities)]
        decoded, codes = [], []
        for s, q in enumerate(self.quantisers):
            outs = [q(per_mod[i][s], generator) for i in range(len(per_mod))]
            decoded.append(torch.stack([o[0] for o in outs], 1))
            codes.append(torch.stack([o[1] for o in outs], 1))
        present = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return self.student.fuse(decoded, present)[0], decoded, codes

    def received(self, onehots: list[torch.Tensor]) -> list[torch.Tensor]:
        """Received codes (one map per stage, (B, h, w, K)) decoded by this group's
        quantiser heads: per stage (B, 1, C, h, w), one more input for the back-end."""
        return [q.decode(o)[:, None] for q, o in zip(self.quantisers, onehots, strict=True)]

    def alone(self, feats: list[torch.Tensor], slot: int = 0) -> torch.Tensor:
        """One input's decoded features (per stage (B, 1, C, h, w)) -> logits of this
        group's back-end with that input in `slot` the only present modality."""
        m = len(self.student.modalities)
        feats = [torch.cat([f.new_zeros(f.shape[0], slot, *f.shape[2:]), f,
                            f.new_zeros(f.shape[0], m - 1 - slot, *f.shape[2:])], 1)
                 for f in feats]
        present = torch.zeros(feats[0].shape[0], m, dtype=torch.bool, device=feats[0].device)
        present[:, slot] = True
        return self.student.fuse(feats, present)[0]

    def from_codes(self, onehots: list[torch.Tensor]) -> torch.Tensor:
        """Received codes -> logits of this group's back-end, as the one present
        modality."""
        return self.alone(self.received(onehots))

    def coded_alone(self, modality: str, image: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """One of this group's modalities alone (B, 3, H, W) through its aligner, the
        group's code space and back-end (the others absent) -> logits."""
        decoded = [q(f, generator)[0][:, None]
                   for q, f in zip(self.quantisers, self.aligned(modality, image), strict=True)]
        return self.alone(decoded, self.student.modalities.index(modality))

    def collaborate(self, own: list[torch.Tensor], onehots: list[torch.Tensor]
                    ) -> torch.Tensor:
        """The official collaboration (heter_codebook_shared_head_c2c_infer.py): this
        group's own decoded features (per stage (B, M, C, h, w), from `coded`) and the
        received codes decoded by its quantiser heads, all present, through its MFF and
        head -> logits."""
        feats = [torch.cat([o, r], 1) for o, r in zip(own, self.received(onehots),
                                                          strict=True)]
        present = torch.ones(feats[0].shape[:2], dtype=torch.bool, device=feats[0].device)
        return self.student.fuse(feats, present)[0]


def pair_name(source: str, target: int) -> str:
    return f"{source}->{target}"


class CodeAlignSystem(nn.Module):
    def __init__(self, student_cfg: StudentConfig, cfg: CodeAlignConfig,
                 num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.groups = nn.ModuleList(GroupModel(build_student(student_cfg, g, num_classes), cfg)
                                    for g in cfg.groups)
        self.translators = nn.ModuleDict()
        for a, group in enumerate(cfg.groups):
            for m in group:
                for b in range(len(cfg.groups)):
                    if b != a:
                        ch = self.groups[a].student.encoder.channels
                        self.translators[pair_name(m, b)] = nn.ModuleList(
                            Translator(c, cfg.codes, cfg.translator_dim, cfg.translator_blocks)
                            for c in ch)

    def group_of(self, modality: str) -> int:
        return next(i for i, g in enumerate(self.cfg.groups) if modality in g)

    def translated_codes(self, source: str, target: int, image: torch.Tensor,
                         generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """Source-modality input (B, 3, H, W) -> one-hot codes of the target's code space
        per stage. Training: hard Gumbel codes; otherwise the argmax index (what is
        transmitted; the official c2c_infer takes the argmax too)."""
        feats = self.groups[self.group_of(source)].aligned(source, image)
        nets = self.translators[pair_name(source, target)]
        sample = (lambda x: hard_gumbel(x, self.cfg.gumbel_tau, generator)) \
            if nets.training else one_hot_argmax
        return [sample(t(f)) for t, f in zip(nets, feats, strict=True)]

    def translate(self, source: str, target: int, image: torch.Tensor,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Source-modality input -> the target back-end's logits, the codes alone."""
        return self.groups[target].from_codes(
            self.translated_codes(source, target, image, generator))


def seg_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Segmentation CE at label resolution (ignore 255): the task loss replacing the
    official detection losses."""
    up = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, label, ignore_index=255)
