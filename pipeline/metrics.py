"""Segmentation scores from one confusion matrix per evaluation.

Conventions as mmsegmentation / CMNeXt: a class with no ground truth and no prediction
is NaN and left out of the means; pixels labelled 255 are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

IGNORE = 255


class Confusion:
    """Accumulates a K x K matrix (rows: ground truth, columns: prediction)."""

    def __init__(self, num_classes: int) -> None:
        self.k = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor | np.ndarray, label: torch.Tensor | np.ndarray) -> None:
        pred = torch.as_tensor(pred).reshape(-1).long()
        label = torch.as_tensor(label).reshape(-1).long()
        valid = label != IGNORE
        idx = label[valid] * self.k + pred[valid]
        self.matrix += torch.bincount(idx, minlength=self.k * self.k).reshape(
            self.k, self.k).cpu().numpy()

    def scores(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        return scores(self.matrix, class_names)


def scores(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU / accuracy / F1 and their NaN-means, plus pixel accuracy (in %)."""
    m = matrix.astype(np.float64)
    tp = np.diag(m)
    gt = m.sum(1)
    pred = m.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (gt + pred - tp)
        acc = tp / gt
        f1 = 2 * tp / (gt + pred)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    total = m.sum()

    def pct(x: float) -> float:
        return round(float(x) * 100, 2) if np.isfinite(x) else float("nan")

    return {
        "mIoU": pct(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mAcc": pct(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan"),
        "mF1": pct(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan"),
        "aAcc": pct(tp.sum() / total) if total else float("nan"),
        "IoU": {n: pct(v) for n, v in zip(names, iou, strict=True)},
        "Acc": {n: pct(v) for n, v in zip(names, acc, strict=True)},
        "F1": {n: pct(v) for n, v in zip(names, f1, strict=True)},
    }
