"""Teacher-code distillation in stage two (not CodeAlign, which is stages.student.codealign):
teacher patch codes as dense targets, code translators, single-modality training.

- The codes as per-pixel targets (`code_map`, `isolated_modality`): `stages.student.code_targets`.
- `CodeTranslators`: one 1x1 convolution per (source modality -> target codebook) from
  the student's last-stage features to code logits (feature -> code). Own-modality
  translators distil the modality's code space; cross-modal ones predict depth's codes
  from RGB features, supervised by the teacher's depth codes of the *same frame* (so not
  CodeAlign's FCF translation, which never sees a co-occurring frame). `decode` turns
  logits back into code vectors of the target space (code -> feature) by soft assignment
  over the frozen codebook.
- `code_loss` (`train.loss.w_teacher_code`): cross-entropy to the teacher's codes, over
  present source modalities only, so an absent modality gets exactly zero gradient.
- `decoded_loss` (`train.loss.w_teacher_decoded`): 1 - cosine between the soft-decoded
  vectors and the teacher's code vectors, a dense feature-space target over the same cells.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from any2seg.precision import upcast
from stages.student.code_targets import NO_CODE, at_features
from stages.student.losses import Total, local


class CodeTranslators(nn.Module):
    """1x1 translators from C-channel features of each source modality to the K codes of
    each target modality's codebook (M x M of them; own and cross-modal)."""

    def __init__(self, modalities: Sequence[str], channels: int, k: int,
                 codebooks: torch.Tensor | None = None) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.k = k
        self.translate = nn.ModuleDict({
            f"{s}->{t}": nn.Conv2d(channels, k, 1) for s in self.modalities
            for t in self.modalities})
        if codebooks is not None:  # (M, K, D) frozen: code -> feature decoding
            self.register_buffer("codebooks", codebooks.float(), persistent=False)

    def forward(self, feats: torch.Tensor, source: str, target: str) -> torch.Tensor:
        """(B, C, h, w) features of `source` -> (B, K, h, w) logits over `target`'s codes."""
        return self.translate[f"{source}->{target}"](feats)

    def decode(self, logits: torch.Tensor, target: str) -> torch.Tensor:
        """Code logits -> (B, D, h, w) soft code vectors of `target`'s feature space."""
        book = self.codebooks[self.modalities.index(target)].to(logits)
        return torch.einsum("bkhw,kd->bdhw", logits.softmax(1), book)


def _translations(translators: CodeTranslators, feats: torch.Tensor, present: torch.Tensor,
                  codes: torch.Tensor) -> Iterator[tuple[str, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]]:
    """Every (present source -> target) translation at the feature grid: (target, logits
    (B', K, h, w), teacher codes (B', h, w) clamped to >= 0, valid (B', h, w) bool).

    Only the batch items where the source is present are translated, so an absent source
    contributes nothing and gets no gradient; cells outside the teacher's view are not
    valid. The one masking rule of every code term."""
    _, _, _, h, w = feats.shape
    target = at_features(codes, (h, w))  # (B, M, h, w)
    for i, source in enumerate(translators.modalities):
        keep = present[:, i]
        if not bool(keep.any()):
            continue
        f = feats[keep, i]
        for j, name in enumerate(translators.modalities):
            y = target[keep, j]
            valid = y != NO_CODE
            if not bool(valid.any()):
                continue
            yield name, translators(f, source, name), y.clamp(min=0), valid


def code_loss(translators: CodeTranslators, feats: torch.Tensor, present: torch.Tensor,
              codes: torch.Tensor, total: Total = local) -> torch.Tensor:
    """Mean cross-entropy of every (present source -> target) translation against the
    teacher's codes of the target modality, at the feature grid.

    feats (B, M, C, h, w) last-stage student features; present (B, M) bool; codes
    (B, M, H, W) long pixel codes (NO_CODE ignored). Pixels of an absent source are
    ignored, so absent modalities contribute nothing and get no gradient. The mean runs over
    the global batch (`total`: sums over data-parallel ranks)."""
    ce_sum = feats.new_zeros(())
    count = feats.new_zeros(())
    for _, logits, y, valid in _translations(translators, feats, present, codes):
        ce = F.cross_entropy(upcast(logits), y, reduction="none")
        ce_sum = ce_sum + (ce * valid).sum()
        count = count + valid.sum()
    return total(ce_sum) / total(count).clamp(min=1)


def decoded_loss(translators: CodeTranslators, feats: torch.Tensor, present: torch.Tensor,
                 codes: torch.Tensor, total: Total = local) -> torch.Tensor:
    """Mean (1 - cosine) between each translation's soft-decoded vector (softmax over the
    codes times the frozen codebook: code -> feature) and the teacher's code vector
    codebook[code], over the same (source, target, cell) set as `code_loss`.

    A dense target in the teacher's feature space: unlike the cross-entropy it does not
    punish a near-miss code whose vector is close to the teacher's. Same arguments, masking
    and global-batch mean as `code_loss`."""
    loss_sum = feats.new_zeros(())
    count = feats.new_zeros(())
    for name, logits, y, valid in _translations(translators, feats, present, codes):
        pred = translators.decode(upcast(logits), name)  # (B', D, h, w)
        book = upcast(translators.codebooks[translators.modalities.index(name)])
        teacher = book[y].permute(0, 3, 1, 2)  # (B', D, h, w)
        cos = F.cosine_similarity(pred, teacher.to(pred), dim=1, eps=1e-8)
        loss_sum = loss_sum + ((1 - cos) * valid).sum()
        count = count + valid.sum()
    return total(loss_sum) / total(count).clamp(min=1)
