"""LSCD losses (Any2Seg section 3.2) and the supervised term.

L = w_sup * CE + w_base * L_base + w_cr * L_cr + w_se * L_se, with the teacher side read
from the cache. L_base (the paper's Tables 5, 7 and 8 keep it in every row but never define
it) is this project's reading of the authors' baseline: the same cross-entropy on the mean
of the per-modality logits (the shared head on each present modality alone, averaged over
the present ones), where L_sup scores the MFF-fused prediction (Eq. 7); docs/ablations.md.
- L_cr (inter-modal correlation): for the present modalities m, the student's M^f_m and
  the teacher's M^e_m = cos(E_m, E_S); KL(softmax(M^f / tau) || softmax(M^e / tau)).
  M^f_m is cos(GAP(f_m), GAP(f_ma)) on the last stage (`gap_correlation`), or under
  `student.mff.variant: author` the correlations that drive MFF's re-weighting (the
  flattened class-score maps vs the anchor, `MFFOutput.correlation`), as the authors'
  code returns them for the loss.
- L_se (semantic structure): class prototypes e_k = masked average of the fused
  features over the pixels of class k (classes present in the batch); the row-softmaxed
  cosine self-similarity of the prototypes is matched to that of E_C by KL.

Every batch-level sum (pixels, rows, prototype sums and counts) goes through `total`:
the identity in one process; under data parallelism the sum over all ranks with the
gradient flowing into this rank's share (`stages.student.distributed.World.total`), so
each term is the loss of the whole global batch whatever the number of ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from any2seg.config import Where

IGNORE = 255
Total = Callable[[torch.Tensor], torch.Tensor]


def local(x: torch.Tensor) -> torch.Tensor:
    """`total` of one process: its batch is the whole batch."""
    return x


@dataclass
class LossConfig:
    """The `train.loss` group of params.yaml."""

    w_sup: float = 1.0
    w_base: float = 0.0  # L_base: CE on the mean of the per-modality logits; 0: off
    w_cr: float = 1.0
    w_se: float = 1.0
    w_teacher_code: float = 0.0  # teacher-code distillation (`stages.student.codes`); 0: off
    w_teacher_decoded: float = 0.0  # 1 - cos of soft-decoded codes to the teacher's; 0: off
    tau_cr: float = 0.1
    tau_se: float = 0.1
    se_features: str = "fused"  # fused: f_ma; decoder: the head's stride-4 features
    distill_warmup: float = 0.0  # fraction of the steps over which w_cr, w_se ramp up from 0
    se_target: str = "teacher"  # teacher: E_C's structure; identity: prototypes kept apart only
    ohem: bool = False
    ohem_thresh: float = 0.7
    ohem_min_fraction: float = 1 / 16

    def validate(self, where: Where | None = None) -> None:
        """Refused before a step is taken: a NaN weight or a zero temperature would only
        show up later as a non-finite loss."""
        where = where or Where("train.loss", None)
        for name in ("w_sup", "w_base", "w_cr", "w_se", "w_teacher_code",
                     "w_teacher_decoded"):
            where.number(name, getattr(self, name), 0, why="a loss weight; 0 switches the "
                         "term off")
        if not (self.w_sup or self.w_base or self.w_cr or self.w_se or self.w_teacher_code or
                self.w_teacher_decoded):
            where.fail("w_sup", "> 0 when w_base, w_cr, w_se, w_teacher_code and "
                       "w_teacher_decoded are 0 (nothing would be trained)", self.w_sup)
        for name in ("tau_cr", "tau_se"):
            where.number(name, getattr(self, name), 0, lo_open=True,
                         why="a softmax temperature")
        where.one_of("se_features", self.se_features, ("fused", "decoder"))
        where.number("distill_warmup", self.distill_warmup, 0, 1,
                     why="a fraction of the training steps")
        where.one_of("se_target", self.se_target, ("teacher", "identity"))
        where.number("ohem_thresh", self.ohem_thresh, 0, 1, lo_open=True,
                     why="a probability")
        where.number("ohem_min_fraction", self.ohem_min_fraction, 0, 1, lo_open=True,
                     why="a fraction of the labelled pixels")


def distill_ramp(step: int, steps: int, warmup: float) -> float:
    """The factor on w_cr and w_se at `step` (0-based): linear from 0 to 1 over the first
    `warmup * steps` steps, so a randomly initialised student can first fit the labels
    before it is asked to match the teacher's structure (not in the paper, off by default).
    A function of the step only, so a resumed run weighs each step as an uninterrupted one."""
    ramp_steps = warmup * steps
    if ramp_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / ramp_steps)


def supervised(logits: torch.Tensor, label: torch.Tensor, cfg: LossConfig,
               total: Total = local) -> torch.Tensor:
    """Cross-entropy at label resolution (ignore 255), the mean over the valid pixels of
    the batch; OHEM as CMNeXt when enabled: keep the pixels whose true-class probability is
    below `ohem_thresh`, at least `ohem_min_fraction` of the valid pixels (when the batch
    has fewer such pixels, each rank tops up from its own share of the batch)."""
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
    if not cfg.ohem:
        pixel_sum = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="sum")
        return total(pixel_sum) / total((label != IGNORE).sum())
    pixel = F.cross_entropy(logits, label, ignore_index=IGNORE, reduction="none").flatten()
    valid = (label.flatten() != IGNORE)
    losses = pixel[valid]
    n_valid = int(total(valid.sum()))
    if n_valid == 0:
        return logits.sum() * 0.0
    thresh = -torch.log(torch.tensor(cfg.ohem_thresh, device=losses.device))
    hard = losses[losses > thresh]
    if int(total(torch.tensor(hard.numel(), device=losses.device))) < \
            max(1, int(n_valid * cfg.ohem_min_fraction)):
        share = int(losses.numel() * cfg.ohem_min_fraction)
        hard = losses.topk(min(losses.numel(), max(1, share))).values
    return total(hard.sum()) / total(torch.tensor(hard.numel(), device=losses.device))


def gap_correlation(student_feats: torch.Tensor, student_fused: torch.Tensor) -> torch.Tensor:
    """M^f = cos(GAP(f_m), GAP(f_ma)): feats (B, M, C, h, w), fused (B, C, h, w) -> (B, M)."""
    gap_m = student_feats.mean(dim=(-2, -1))  # (B, M, C)
    gap_a = student_fused.mean(dim=(-2, -1))  # (B, C)
    return F.cosine_similarity(gap_m, gap_a[:, None], dim=-1)


def correlation_kl(m_f: torch.Tensor, present: torch.Tensor, teacher_visual: torch.Tensor,
                   teacher_scene: torch.Tensor, tau: float = 0.1,
                   total: Total = local) -> torch.Tensor:
    """L_cr from the student's correlations m_f (B, M); present (B, M); teacher_visual
    (B, M, D); teacher_scene (B, D). Samples with one present modality carry no
    correlation and are skipped; the mean runs over the others (on every rank)."""
    m_e = F.cosine_similarity(teacher_visual, teacher_scene[:, None], dim=-1)
    rows = present.sum(1) > 1
    n_rows = total(rows.sum())
    if int(n_rows) == 0:
        return m_f.sum() * 0.0
    neg = torch.finfo(m_f.dtype).min
    log_p = F.log_softmax((m_f / tau).masked_fill(~present, neg), dim=1)[rows]
    log_q = F.log_softmax((m_e.to(m_f.dtype) / tau).masked_fill(~present, neg), dim=1)[rows]
    p = log_p.exp() * present[rows]
    return total((p * (log_p - log_q)).masked_fill(~present[rows], 0.0).sum()) / n_rows


def correlation(student_feats: torch.Tensor, student_fused: torch.Tensor,
                present: torch.Tensor, teacher_visual: torch.Tensor,
                teacher_scene: torch.Tensor, tau: float = 0.1,
                total: Total = local) -> torch.Tensor:
    """L_cr with M^f = `gap_correlation` (the `pixel` and `paper` variants)."""
    return correlation_kl(gap_correlation(student_feats, student_fused), present,
                          teacher_visual, teacher_scene, tau, total)


def prototypes(fused: torch.Tensor, label: torch.Tensor, num_classes: int,
               total: Total = local) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling of the bilinearly upsampled features: (K', C) prototypes of
    the classes present in `label`, and their class indices.

    Upsampling is linear (U f = f A), so the average of U f over class k's pixels is
    f (A^T 1_k) / n_k: the class masks are pulled back to feature resolution through the
    adjoint of the upsampling instead of pushing C channels up to label resolution.
    """
    b, c, h, w = fused.shape
    valid = label != IGNORE
    counts = total(torch.bincount(label[valid], minlength=num_classes))
    classes = counts.nonzero().squeeze(1)
    onehot = (label[:, None] == classes[None, :, None, None]).to(fused.dtype)  # (B, K', H, W)
    if (h, w) != tuple(label.shape[-2:]):
        with torch.enable_grad():
            probe = torch.zeros(b, classes.numel(), h, w, dtype=fused.dtype,
                                device=fused.device, requires_grad=True)
            up = F.interpolate(probe, size=label.shape[-2:], mode="bilinear",
                               align_corners=False)
            (weights,) = torch.autograd.grad(up, probe, grad_outputs=onehot)
    else:
        weights = onehot
    sums = total(torch.einsum("bkhw,bchw->kc", weights.detach(), fused))
    return sums / counts[classes, None].to(fused.dtype), classes


def semantic(fused: torch.Tensor, label: torch.Tensor, class_embeddings: torch.Tensor,
             tau: float = 0.1, total: Total = local) -> torch.Tensor:
    """L_se over the classes present in the batch (needs at least two)."""
    protos, classes = prototypes(fused, label, class_embeddings.shape[0], total)
    if classes.numel() < 2:
        return fused.sum() * 0.0
    s_f = F.cosine_similarity(protos[:, None], protos[None], dim=-1)
    e = class_embeddings[classes].to(protos.dtype)
    s_e = F.cosine_similarity(e[:, None], e[None], dim=-1)
    log_p = F.log_softmax(s_f / tau, dim=1)
    log_q = F.log_softmax(s_e / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()
