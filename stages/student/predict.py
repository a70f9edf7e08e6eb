"""A trained student applied to frames without labels, exactly as `pipeline evaluate` scores
them, for users who embed it:

    from stages.student.predict import load_student
    student = load_student("runs/deliver/best.pt")
    labels, probs = student.predict({"rgb": "frame_rgb.png", "depth": depth_array})

A frame goes through the same steps as in `pipeline evaluate` for the same data set,
protocol and subset: the reader's decoding, the protocol's resize (`stages.student.
protocol`), `to_unit` and the normalisation (`stages.student.data.model_input`), and
`stages.student.evaluate.infer` under the same missing-modality mode (whole frame or
sliding window). So its argmax is evaluate's prediction; outputs are at the resolution
evaluate scores (the official protocol's resize for DELIVER; the stored size otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from any2seg import datasets
from any2seg.datasets.base import unit_image
from any2seg.errors import PipelineError
from stages.student.data import model_input
from stages.student.eval_config import EvalConfig
from stages.student.evaluate import infer, load_checkpoint, subset_name
from stages.student.protocol import check_protocol, protocol_transform

Array = np.ndarray


@dataclass
class Prepared:
    """One frame ready for the student: the (M, 3, H, W) input with every absent modality
    a black frame, and the pictures of the given modalities at that resolution."""

    images: torch.Tensor
    subset: tuple[str, ...]
    display: dict[str, Array] = field(default_factory=dict)  # H x W x 3 uint8


class Student:
    """A loaded checkpoint with the inference settings `pipeline evaluate` would use for
    `dataset` (protocol, missing-modality mode, whole / sliding window)."""

    def __init__(self, model: torch.nn.Module, meta: dict[str, Any], dataset: str,
                 config: EvalConfig, device: str) -> None:
        self.model, self.meta, self.dataset, self.device = model, meta, dataset, device
        self.config = config
        self.protocol = check_protocol(config.resolved_protocol(dataset))
        model.missing = config.resolved_missing(dataset, model.missing)
        self.transform = protocol_transform(self.protocol, dataset)
        self.reader = datasets.get(dataset)
        self.filler_cache: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    @property
    def modalities(self) -> list[str]:
        """The modalities the checkpoint was trained on, in its order."""
        return list(self.model.modalities)

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def palette(self) -> list[tuple[int, int, int]]:
        return [tuple(c) for c in self.meta["palette"]]

    @property
    def missing(self) -> str:
        return self.model.missing

    def check_subset(self, given: list[str]) -> tuple[str, ...]:
        """The given modalities in the checkpoint's order; one line for an unknown one."""
        unknown = [m for m in given if m not in self.modalities]
        if unknown:
            raise PipelineError(f"the checkpoint was trained on {', '.join(self.modalities)}; "
                                f"{unknown[0]} is not one of them, and a modality it never "
                                "saw cannot be fed: leave it out")
        if not given:
            raise PipelineError("no modality given; give at least one of "
                                f"{', '.join(self.modalities)}")
        return tuple(m for m in self.modalities if m in given)

    def read(self, files: dict[str, Path]) -> dict[str, Array]:
        """One frame's files decoded as the data set's reader decodes them."""
        return self.reader.decode_inputs({m: Path(p) for m, p in files.items()})

    def prepare(self, arrays: dict[str, Array],
                ranges: dict[str, tuple[float, float]] | None = None) -> Prepared:
        """Stored arrays (H x W x 3, as the reader returns them) -> the model input, through
        the protocol's resize and the normalisation evaluate uses."""
        subset = self.check_subset(list(arrays))
        if self.transform is not None:
            arrays, _ = self.transform(dict(arrays), None)
        sizes = {a.shape[:2] for a in arrays.values()}
        if len(sizes) != 1:
            raise PipelineError("the modalities of one frame differ in size ("
                                + ", ".join(f"{m} {a.shape[1]}x{a.shape[0]}"
                                            for m, a in arrays.items()) + ")")
        (h, w), = sizes
        full = {m: arrays[m] if m in arrays else np.zeros((h, w, 3), np.uint8)
                for m in self.modalities}  # absent: a black frame
        display = {m: np.round(unit_image(arrays[m], (ranges or {}).get(m)) * 255)
                   .astype(np.uint8) for m in subset}
        return Prepared(model_input(full, self.modalities), subset, display)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, subset: tuple[str, ...]) -> torch.Tensor:
        """(B, M, 3, H, W) model inputs -> (B, K, H, W) logits under `subset`, through
        evaluate's `infer` (same windows, same filler features)."""
        mask = torch.zeros(1, len(self.modalities), dtype=torch.bool)
        mask[0, [self.modalities.index(m) for m in subset]] = True
        dtype = next(self.model.parameters()).dtype
        c = self.config
        return infer(self.model, images.to(self.device, dtype), mask.to(self.device), c.mode,
                     c.crop, c.stride, self.filler_cache)[0]

    def predict_prepared(self, frames: list[Prepared]) -> list[tuple[Array, Array]]:
        """Frames of one subset and size as one batch -> [(labels (H, W) int64,
        probs (K, H, W) float32)]."""
        subset = frames[0].subset
        if any(f.subset != subset or f.images.shape != frames[0].images.shape
               for f in frames):
            raise PipelineError("a batch needs frames of one modality subset and one size")
        logits = self.logits(torch.stack([f.images for f in frames]), subset)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        labels = logits.argmax(1).cpu().numpy()
        probs = torch.softmax(logits, dim=1).cpu().numpy()
        return [(labels[i], probs[i]) for i in range(len(frames))]

    def predict(self, modalities: dict[str, Array | str | Path]) -> tuple[Array, Array]:
        """One frame {modality: stored array or image file} of any subset of the
        checkpoint's modalities -> labels (H, W) int64 and class probabilities
        (K, H, W) float32, at the resolution `pipeline evaluate` scores."""
        files = {m: Path(v) for m, v in modalities.items() if isinstance(v, (str, Path))}
        arrays = {m: v for m, v in modalities.items() if not isinstance(v, (str, Path))}
        self.check_subset(list(modalities))
        if files:
            arrays.update(self.read(files))
        return self.predict_prepared([self.prepare(arrays)])[0]

    def describe(self) -> str:
        """How frames are read and predicted, in one line."""
        return (f"{self.dataset} protocol `{self.protocol}`, missing modalities "
                f"`{self.missing}`, {self.config.mode} inference")


def load_student(path: Path | str, device: str = "cpu", dataset: str | None = None,
                 config: EvalConfig | None = None) -> Student:
    """A checkpoint ready to predict as `pipeline evaluate` would score `dataset` (default:
    the one it was trained on) under `config` (the `eval` group; default: its defaults,
    i.e. the data set's protocol and the protocol's missing-modality mode)."""
    config = config or EvalConfig()
    config.validate()
    model, meta = load_checkpoint(path, device)
    name = dataset or meta["dataset"]
    datasets.get(name)  # an unknown name is refused here, in one line
    if list(datasets.get(name).classes) != list(meta["classes"]):
        raise PipelineError(f"{path} was trained on other classes than {name}'s")
    return Student(model, meta, name, config, device)


def subset_label(modalities: list[str], subset: tuple[str, ...]) -> str:
    """R+D style name of a subset, as evaluate's reports name it."""
    return subset_name(modalities, tuple(modalities.index(m) for m in subset))
