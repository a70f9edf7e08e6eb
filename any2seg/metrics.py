"""Segmentation scores from one confusion matrix per evaluation.

`mIoU`, `mAcc` and `mF1` are averaged exactly as the official DELIVER / CMNeXt / MISS
`semseg/metrics.py` (`Metrics.compute_iou`, `compute_pixel_acc`, `compute_f1`): a class
whose ratio is 0/0 (absent from labels, and for IoU / F1 also from predictions) counts 0,
and the mean runs over all K classes. This is what the published tables report.
`mIoU_present`, `mAcc_present` and `mF1_present` average only the classes whose ratio is
defined (mmsegmentation's `nanmean`), which reads better on small or single-condition
subsets. Per-class values stay NaN where undefined (the official table prints 0.00
there). Pixels labelled 255 are ignored. Counts are exact int64 and ratios float64 (the
official code accumulates a float32 matrix, which rounds counts above 2**24).
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


def _pct(x: float) -> float:
    return round(float(x) * 100, 2) if np.isfinite(x) else float("nan")


def official_mean(values: np.ndarray) -> float:
    """The official mean: undefined (NaN) ratios count 0, divided by all K classes."""
    return float(np.where(np.isnan(values), 0.0, values).mean())


def present_mean(values: np.ndarray) -> float:
    """The mean over classes whose ratio is defined; NaN when none is."""
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def scores(matrix: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU / accuracy / F1, their official and present-class means, and pixel
    accuracy, in % rounded to 2 decimals as the official code prints them."""
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
    return {
        "mIoU": _pct(official_mean(iou)),
        "mAcc": _pct(official_mean(acc)),
        "mF1": _pct(official_mean(f1)),
        "aAcc": _pct(tp.sum() / total) if total else float("nan"),
        "mIoU_present": _pct(present_mean(iou)),
        "mAcc_present": _pct(present_mean(acc)),
        "mF1_present": _pct(present_mean(f1)),
        "IoU": {n: _pct(v) for n, v in zip(names, iou, strict=True)},
        "Acc": {n: _pct(v) for n, v in zip(names, acc, strict=True)},
        "F1": {n: _pct(v) for n, v in zip(names, f1, strict=True)},
    }
