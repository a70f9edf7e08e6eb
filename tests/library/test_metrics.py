import numpy as np
import pytest
import torch

from any2seg.metrics import Confusion, scores


def official_metrics(hist: np.ndarray) -> dict[str, float]:
    """The arithmetic of jamycheung/DELIVER `semseg/metrics.py` (identical in RuipingL/MISS):
    lines 17-24 (`compute_iou`), 26-33 (`compute_f1`), 35-42 (`compute_pixel_acc`): a float32
    histogram, NaN ratios set to 0, the mean over all classes, x100, Python `round(., 2)`."""
    h = torch.tensor(hist, dtype=torch.float32)
    out = {}
    for key, num, den in (("mIoU", h.diag(), h.sum(0) + h.sum(1) - h.diag()),
                          ("mF1", 2 * h.diag(), h.sum(0) + h.sum(1)),
                          ("mAcc", h.diag(), h.sum(1))):
        ratio = num / den
        ratio[ratio.isnan()] = 0.0
        out[key] = round(ratio.mean().item() * 100, 2)
    return out


def test_hand_computed_confusion_matrix():
    """4 classes, class d absent from labels and predictions: the official mean counts it
    as 0 over all 4 classes (DELIVER semseg/metrics.py:19-20), the present mean skips it."""
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 0, 2]])
    conf = Confusion(4)
    conf.update(pred, label)
    expected = np.array([[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(conf.matrix, expected)
    s = scores(conf.matrix, ["a", "b", "c", "d"])
    # IoU: a 1/(2+2-1)=1/3, b 2/(3+3-2)=1/2, c 1/(2+2-1)=1/3, d absent (NaN per class)
    assert s["IoU"]["a"] == pytest.approx(33.33) and s["IoU"]["b"] == 50.0
    assert np.isnan(s["IoU"]["d"])
    assert s["mIoU"] == round(100 * (1 / 3 + 1 / 2 + 1 / 3 + 0) / 4, 2) == 29.17
    assert s["mIoU_present"] == round(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3, 2) == 38.89
    assert s["mAcc"] == round(100 * (1 / 2 + 2 / 3 + 1 / 2 + 0) / 4, 2)
    assert s["mAcc_present"] == round(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3, 2)
    assert s["mF1"] == round(100 * (2 / 4 + 4 / 6 + 2 / 4 + 0) / 4, 2)
    assert s["aAcc"] == pytest.approx(100 * 4 / 7, abs=0.01)
    assert s["F1"]["b"] == pytest.approx(100 * 2 * 2 / 6, abs=0.01)
    assert {k: s[k] for k in ("mIoU", "mF1", "mAcc")} == official_metrics(conf.matrix)


def test_twenty_five_classes_one_absent_and_one_only_predicted():
    """DELIVER-sized case: class 24 never occurs, class 23 is only predicted (IoU 0, accuracy
    0/0 -> 0 officially), so mAcc drops more than mIoU (semseg/metrics.py:35-42)."""
    rng = np.random.default_rng(0)
    hist = np.diag(rng.integers(500, 5000, 25)).astype(np.int64)
    hist += rng.integers(0, 300, (25, 25))
    hist[24, :] = 0
    hist[:, 24] = 0
    hist[23, :] = 0  # never in the labels...
    hist[0, 23] = 400  # ...but predicted
    s = scores(hist)
    assert {k: s[k] for k in ("mIoU", "mF1", "mAcc")} == official_metrics(hist)
    assert s["mIoU"] < s["mIoU_present"] and s["mAcc"] < s["mAcc_present"]
    assert np.isnan(s["Acc"]["23"]) and s["IoU"]["23"] == 0.0 and np.isnan(s["IoU"]["24"])


def test_empty_matrix_scores_zero_like_the_official_code():
    """No valid pixel: every ratio is 0/0, which the official code turns into 0."""
    s = scores(np.zeros((3, 3), np.int64))
    assert s["mIoU"] == s["mAcc"] == s["mF1"] == 0.0
    assert np.isnan(s["mIoU_present"]) and np.isnan(s["aAcc"])
