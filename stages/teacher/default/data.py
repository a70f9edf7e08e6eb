"""What the default teacher is fitted and scored on: every modality of a split preprocessed
exactly as stage one does, the template captions, and each patch's share of every class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from any2seg.errors import PipelineError
from stages.teacher.captioners.template import TemplateCaptioner, compose
from stages.teacher.default.config import FitConfig


@dataclass
class SplitData:
    pixels: dict[str, torch.Tensor]  # modality -> (N, 3, S, S) as the branch sees it
    captions: list[str]
    parts: list[tuple[str, list[str]]]  # the caption's opening and class names
    conditions: list[str]
    regions: torch.Tensor  # (N, K, P) share of each patch's pixels per class
    labels: torch.Tensor  # (N, S, S) the label under the same resize/crop, 255 ignore


def _label_view(label: np.ndarray, size: int) -> torch.Tensor:
    """The label under the preprocessing's geometry (short side to `size`, centre crop),
    nearest-neighbour."""
    h, w = label.shape
    short, long = min(h, w), max(h, w)
    new_h, new_w = (size, int(size * long / short)) if h <= w else (int(size * long / short),
                                                                    size)
    t = torch.from_numpy(label.astype(np.int64))[None, None].float()
    t = F.interpolate(t, size=(new_h, new_w), mode="nearest")[0, 0].long()
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return t[top:top + size, left:left + size]


def load_split(root: Path, split: str, branch_of: dict[str, str], num_classes: int,
               cfg: FitConfig) -> SplitData:
    from stages.teacher.config import TeacherConfig
    from stages.teacher.languagebind import preprocess_depth, preprocess_image
    from stages.teacher.worker import load_samples, model_input

    tcfg = TeacherConfig(dataset="sample", root=str(root), split=[split],
                         modalities=list(branch_of), modality_branch=dict(branch_of))
    samples = load_samples(tcfg)
    if len(samples) == 0:
        raise PipelineError(f"the sample at {root} has no {split} frames to fit the teacher on")
    captioner = TemplateCaptioner(samples.classes)
    pixels: dict[str, list[torch.Tensor]] = {m: [] for m in branch_of}
    parts, conditions, labels = [], [], []
    for sample in samples:
        for m, b in branch_of.items():
            x = model_input(sample, m, b)
            pixels[m].append(preprocess_depth(x, cfg.max_depth, cfg.image_size) if b == "depth"
                             else preprocess_image(x, cfg.image_size))
        parts.append(captioner.parts(sample.label, sample.condition))
        conditions.append(sample.condition or "")
        labels.append(_label_view(sample.label, cfg.image_size))
    label_t = torch.stack(labels)
    onehot = F.one_hot(label_t.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
    grid = cfg.image_size // cfg.patch
    regions = F.adaptive_avg_pool2d(onehot.permute(0, 3, 1, 2).float(), grid).flatten(2)
    return SplitData({m: torch.stack(v) for m, v in pixels.items()},
                     [compose(*p) for p in parts], parts, conditions, regions, label_t)
