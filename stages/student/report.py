"""Pictures of an evaluation: MISS subsets, per-class IoU, predictions beside inputs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

IGNORE = 255


def subset_chart(miou: dict[str, float], path: Path, note: str = "") -> Path:
    names = list(miou)
    values = [0.0 if np.isnan(v) else v for v in miou.values()]
    mean = float(np.nanmean(list(miou.values())))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names)), 3.5))
    ax.bar(names, values, color="#4477aa")
    ax.axhline(mean, color="#cc3311", linestyle="--", label=f"mean {mean:.2f}")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("system-level MISS: mIoU per modality subset" + (f"\n({note})" if note else ""),
                 fontsize=10)
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_chart(iou: dict[str, float], path: Path, note: str = "") -> Path:
    """Bars per class; a class scored 0 gets a red marker on the axis and an absent one
    (in neither labels nor predictions) a grey hatched stub, so the two never look alike."""
    names = list(iou)
    raw = list(iou.values())
    top = max([v for v in raw if not np.isnan(v)] + [1.0])
    values = [0.02 * top if np.isnan(v) else v for v in raw]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 3.5))
    bars = ax.bar(names, values, color=["#dddddd" if np.isnan(v) else "#228833" for v in raw])
    for bar, v in zip(bars, raw, strict=True):
        if np.isnan(v):
            bar.set_hatch("///")
            bar.set_edgecolor("#777777")
    zero = [i for i, v in enumerate(raw) if v == 0]
    if zero:
        ax.scatter(zero, [0.0] * len(zero), marker="v", color="#cc3311", zorder=3,
                   label="IoU 0")
        ax.legend(fontsize=7)
    ax.set_ylabel("IoU (%)")
    ax.set_title("per-class IoU (MSS; hatched grey: class absent; red: IoU 0)" +
                 (f"\n({note})" if note else ""), fontsize=10)
    plt.setp(ax.get_xticklabels(), rotation=60, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sensor_chart(miou: dict[str, float], frames: dict[str, int], path: Path,
                 note: str = "") -> Path:
    """Sensor-level MISS: mIoU per weather / failure group, each labelled with its frames."""
    names = [f"{g}\n({frames.get(g, 0)} fr.)" for g in miou]
    values = [0.0 if np.isnan(v) else v for v in miou.values()]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names)), 3.5))
    ax.bar(names, values, color="#ee7733")
    mean = float(np.nanmean(list(miou.values()))) if miou else float("nan")
    ax.axhline(mean, color="#0077bb", linestyle="--",
               label=f"mean of {len(miou)} groups {mean:.2f}")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("sensor-level MISS: mIoU per weather / failure group" +
                 (f"\n({note})" if note else ""), fontsize=10)
    ax.legend(fontsize=7)
    plt.setp(ax.get_xticklabels(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def colourise(label: np.ndarray, palette: list[tuple[int, int, int]]) -> np.ndarray:
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    return table[np.clip(label, 0, 255).astype(np.int64)]


def _wrap_id(sample_id: str, width: int = 18) -> str:
    """Break a long sample id after its slashes so that it fits beside a tile."""
    lines = [""]
    for piece in re.split(r"(?<=/)", sample_id):  # "a/b/c" -> "a/", "b/", "c"
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n".join(lines)


def predictions_figure(examples: list[dict[str, Any]], modalities: list[str],
                       palette: list[tuple[int, int, int]], classes: list[str],
                       titles: dict[str, str] | None = None) -> Figure:
    """One row per sample (its id and weather / failure case on the left): every input
    modality, the ground truth and the prediction under titled columns, and a legend of the
    colours of the classes that appear in the drawn labels and predictions."""
    columns = [*((titles or {}).get(m, m) for m in modalities), "ground truth", "prediction"]
    h, w = examples[0]["label"].shape
    tile = min(3.0, max(1.6, w / 100))  # inches per tile
    fig, axes = plt.subplots(len(examples), len(columns), squeeze=False, layout="constrained",
                             figsize=(tile * len(columns) + 1.2,
                                      tile * h / w * len(examples) + 1.4))
    shown: set[int] = set()
    for row, ex in enumerate(examples):
        label = ex["label"]
        pred = ex["pred"][: label.shape[0], : label.shape[1]]
        shown |= set(np.unique(label).tolist()) | set(np.unique(pred).tolist())
        tiles = [ex[m] for m in modalities] + [colourise(label, palette),
                                               colourise(pred, palette)]
        for col, (ax, image) in enumerate(zip(axes[row], tiles, strict=True)):
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(columns[col], fontsize=9)
        condition = " / ".join(str(c) for c in (ex.get("condition"), ex.get("case")) if c)
        axes[row][0].set_ylabel(f"{_wrap_id(ex['id'])}\n[{condition or 'no condition'}]",
                                fontsize=7, rotation=0, ha="right", va="center")
    handles = [Patch(facecolor=np.asarray(palette[k]) / 255, edgecolor="#555555",
                     label=classes[k]) for k in sorted(shown) if k < len(classes)]
    if IGNORE in shown:
        handles.append(Patch(facecolor="black", edgecolor="#555555", label="ignore (255)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6) or 1,
               fontsize=7, frameon=False, title="classes shown", title_fontsize=8)
    return fig


def predictions_grid(examples: list[dict[str, Any]], modalities: list[str],
                     palette: list[tuple[int, int, int]], classes: list[str],
                     path: Path, titles: dict[str, str] | None = None) -> Path:
    """`predictions_figure` saved as a PNG (`titles`: column titles, e.g. depth (HHA))."""
    fig = predictions_figure(examples, modalities, palette, classes, titles)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
