"""Pictures of an evaluation: MISS subsets, per-class IoU, predictions beside inputs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def subset_chart(miou: dict[str, float], path: Path) -> Path:
    names = list(miou)
    values = [0.0 if np.isnan(v) else v for v in miou.values()]
    mean = float(np.nanmean(list(miou.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    ax.bar(names, values, color="#4477aa")
    ax.axhline(mean, color="#cc3311", linestyle="--", label=f"mean {mean:.2f}")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("system-level MISS: mIoU per modality subset")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_chart(iou: dict[str, float], path: Path) -> Path:
    names = list(iou)
    values = [0.0 if np.isnan(v) else v for v in iou.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    ax.bar(names, values, color=["#999999" if np.isnan(v) else "#228833" for v in iou.values()])
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU (MSS; grey: class absent)")
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def colourise(label: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.clip(label, 0, 255).astype(np.int64)]


def predictions_grid(examples: list[dict[str, np.ndarray]], modalities: list[str],
                     palette: list[tuple[int, int, int]], path: Path) -> Path:
    """One row per sample: every input modality, the ground truth, the prediction."""
    rows = []
    for ex in examples:
        h, w = ex["label"].shape
        pred = ex["pred"]
        if pred.shape != (h, w):
            pred = pred[:h, :w]
        tiles = [ex[m] for m in modalities] + [colourise(ex["label"], palette),
                                               colourise(pred, palette)]
        rows.append(np.concatenate(tiles, axis=1))
    from PIL import Image

    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    return path
