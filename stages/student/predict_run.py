"""What `pipeline predict` runs: find the frames (a registered data set split, or one folder
or file list per modality matched by file stem), predict them in batches, and write every
output into a temporary sibling folder that replaces `--out` only when all is written.

Outputs per frame, under the frame's id: `labels/<id>.png` (class indices as a palette PNG
with the data set's colours), `overlays/<id>.png` (the colours over the first given
modality), with `save_probs` `probs/<id>.npz` (float16 class probabilities (K, H, W));
and `predictions.json`, the run's summary.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from any2seg.config import dataset_root
from any2seg.datasets import Record
from any2seg.errors import DatasetError, PipelineError
from any2seg.progress import progress as progress_bar
from any2seg.publish import publish
from any2seg.runlock import check_outside, check_run_folder
from stages.student.predict import Prepared, Student, subset_label
from stages.student.provenance import sha256_prefix

log = logging.getLogger("pipeline.predict")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OWNED = ("predictions.json", "labels", "overlays", "probs")  # what --overwrite replaces
OVERLAY_ALPHA = 0.5


@dataclass
class Frame:
    """One frame to predict: its id (the output name) and its files; `record` when it
    comes from a registered data set (read with its label when the label exists, exactly
    as evaluate reads it)."""

    id: str
    files: dict[str, Path]
    record: Record | None = None


# ---------------------------------------------------------------------------------------
# finding frames
# ---------------------------------------------------------------------------------------
def frames_from_dataset(student: Student, root: Path | None, split: str,
                        subset: tuple[str, ...]) -> list[Frame]:
    """The split's frames in the reader's order, with the subset's files."""
    reader = student.reader
    where = dataset_root(student.dataset, root)
    records = reader.index(where, split, modalities=list(subset))
    if not records:
        raise PipelineError(f"no {student.dataset} frames of split {split} under {where}")
    return [Frame(r.id, {k: p for k, p in r.files.items() if k != "label"}, r)
            for r in records]


def frame_key(stem: str, modality: str) -> str:
    """The frame a file belongs to: its stem without a trailing `_<modality>` or
    `_<modality>_<view>` (DELIVER's 0001_rgb_front.png and 0001_depth_front.png are frame
    0001); other stems as they are."""
    match = re.fullmatch(rf"(.+)_{re.escape(modality)}(_[A-Za-z0-9]+)?", stem)
    return match.group(1) if match else stem


def list_inputs(modality: str, path: Path) -> dict[str, Path]:
    """{frame key: file} of one modality: a folder's image files (not recursive) or a text
    file listing one file per line (relative to the list's folder)."""
    flag = f"--{modality}"
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PipelineError(f"{flag} {path} holds no image files "
                                f"({', '.join(IMAGE_SUFFIXES)}); give the folder of the "
                                f"{modality} frames")
    elif path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{flag} {path} is neither a folder nor a readable list of "
                                f"files ({exc})") from exc
        files = [(path.parent / line.strip()) for line in lines if line.strip()]
        absent = [f for f in files if not f.is_file()]
        if absent:
            raise PipelineError(f"{flag} {path} lists {absent[0]}, which does not exist; fix "
                                "the list")
        if not files:
            raise PipelineError(f"{flag} {path} lists no files")
    else:
        raise PipelineError(f"{flag} {path} does not exist; give a folder of {modality} "
                            "frames or a text file listing them")
    keyed: dict[str, Path] = {}
    for f in files:
        key = frame_key(f.stem, modality)
        if key in keyed:
            raise PipelineError(f"{flag}: {keyed[key].name} and {f.name} are both frame {key}; "
                                "keep one file per frame")
        keyed[key] = f
    return keyed


def frames_from_inputs(inputs: dict[str, Path], subset: tuple[str, ...],
                       skip_bad: bool = False) -> list[Frame]:
    """Frames matched by stem across the modalities' inputs, in sorted stem order. A frame
    missing one of them is refused (with `skip_bad`: skipped with a warning)."""
    listed = {m: list_inputs(m, inputs[m]) for m in subset}
    keys = sorted(set().union(*listed.values()))
    common = set.intersection(*(set(v) for v in listed.values()))
    if len(subset) > 1 and not common:
        a = subset[0]
        b = next((m for m in subset[1:] if not set(listed[m]) & set(listed[a])), subset[1])
        raise PipelineError(
            f"--{a} {inputs[a]} and --{b} {inputs[b]} share no frame: frames are matched by "
            f"file stem (e.g. {next(iter(listed[a].values())).name} and "
            f"{next(iter(listed[b].values())).name} do not match); name the files of one "
            "frame alike (0001.png, or 0001_<modality>.png)")
    frames, incomplete = [], []
    for key in keys:
        absent = [m for m in subset if key not in listed[m]]
        if absent:
            have = next(m for m in subset if key in listed[m])
            incomplete.append(f"frame {key} has {have} ({listed[have][key]}) but no "
                              f"{absent[0]} in {inputs[absent[0]]}")
            continue
        frames.append(Frame(key, {m: listed[m][key] for m in subset}))
    if incomplete and not skip_bad:
        more = f" (and {len(incomplete) - 1} more)" if len(incomplete) > 1 else ""
        raise PipelineError(f"{incomplete[0]}{more}; give every requested modality for every "
                            "frame, or pass --skip-bad to skip such frames")
    for line in incomplete:
        log.warning("skipping: %s", line)
    return frames


# ---------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------
def label_png(labels: np.ndarray, palette: list[tuple[int, int, int]]) -> Image.Image:
    """Class indices as a palette PNG (opens as a picture; the pixel values are the
    classes); more than 256 classes: a 16-bit grey PNG."""
    if len(palette) > 256:
        return Image.fromarray(labels.astype(np.uint16))
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    flat = [v for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    return img


def overlay(picture: np.ndarray, labels: np.ndarray,
            palette: list[tuple[int, int, int]]) -> np.ndarray:
    """The class colours blended over a picture (H x W x 3 uint8)."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    mixed = (1 - OVERLAY_ALPHA) * picture.astype(np.float32) + OVERLAY_ALPHA * colours
    return np.round(mixed).astype(np.uint8)


def _write_frame(tmp: Path, frame_id: str, prepared: Prepared, labels: np.ndarray,
                 probs: np.ndarray, student: Student, save_probs: bool) -> None:
    for sub in ("labels", "overlays", "probs"):
        if sub != "probs" or save_probs:
            (tmp / sub / frame_id).parent.mkdir(parents=True, exist_ok=True)
    label_png(labels, student.palette).save(tmp / "labels" / f"{frame_id}.png")
    first = prepared.display[prepared.subset[0]]
    Image.fromarray(overlay(first, labels, student.palette)).save(
        tmp / "overlays" / f"{frame_id}.png")
    if save_probs:
        np.savez_compressed(tmp / "probs" / f"{frame_id}.npz",
                            probs=probs.astype(np.float16), classes=np.array(student.classes))


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------
def check_out(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse, before anything is read: an --out that cannot be a folder, one inside an
    input, an input inside it, or an existing non-empty one without --overwrite."""
    check_run_folder(out)
    for p in inputs:
        check_outside(out, p, "--out", "the input")
        if out.exists() and out.resolve() in p.resolve().parents:
            raise PipelineError(f"the input {p} is inside --out {out}; --overwrite would "
                                "delete it: write the predictions elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PipelineError(f"--out {out} exists and is not empty; pass --overwrite to "
                            f"replace its {', '.join(OWNED)}, or choose another --out")


def _safe_id(frame_id: str) -> str:
    parts = Path(frame_id).parts
    if Path(frame_id).is_absolute() or ".." in parts or not parts:
        raise PipelineError(f"frame id {frame_id!r} cannot name an output file")
    return frame_id


def predict_frames(student: Student, frames: list[Frame], out: Path, *, checkpoint: Path,
                   batch_size: int = 1, save_probs: bool = False, skip_bad: bool = False,
                   progress: bool = False, source: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
    """Predict `frames` in batches of one subset and size; write the outputs into a
    temporary sibling of `out` and publish them there at the end (nothing is left at
    `out` when a frame fails). Returns the summary written as predictions.json."""
    if batch_size < 1:
        raise PipelineError(f"--batch-size must be >= 1, got {batch_size}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    done: list[str] = []
    skipped: list[dict[str, str]] = []
    subsets: set[str] = set()
    t0 = time.perf_counter()
    try:
        pending: list[tuple[Frame, Prepared]] = []

        def flush() -> None:
            for (frame, prepared), (labels, probs) in zip(
                    pending, student.predict_prepared([p for _, p in pending]), strict=True):
                _write_frame(tmp, _safe_id(frame.id), prepared, labels, probs, student,
                             save_probs)
                done.append(frame.id)
            pending.clear()

        for frame in progress_bar(frames, desc="predicting", unit="frame", enabled=progress,
                                  leave=False):
            try:
                prepared = student.prepare(*read_frame(student, frame))
            except DatasetError as exc:
                if not skip_bad:
                    raise
                log.warning("skipping %s: %s", frame.id, exc)
                skipped.append({"id": frame.id, "reason": str(exc)})
                continue
            subsets.add(subset_label(student.modalities, prepared.subset))
            if pending and (len(pending) >= batch_size or pending[0][1].subset !=
                            prepared.subset or pending[0][1].images.shape !=
                            prepared.images.shape):
                flush()
            pending.append((frame, prepared))
        if pending:
            flush()
        if not done:
            raise PipelineError("no frame was predicted (every frame was skipped); see the "
                                "warnings above")
        seconds = time.perf_counter() - t0
        summary = {
            "checkpoint": {"path": str(checkpoint), "sha256": sha256_prefix(checkpoint),
                           "step": student.meta.get("step")},
            "dataset": student.dataset, "protocol": student.protocol,
            "missing": student.missing, "mode": student.config.mode,
            "crop": student.config.crop, "stride": student.config.stride,
            "subset": sorted(subsets), "classes": student.classes,
            "source": source or {}, "device": student.device, "batch_size": batch_size,
            "frames": len(done), "skipped": skipped, "seconds": round(seconds, 3),
            "seconds_per_frame": round(seconds / len(done), 4),
            "outputs": {"labels": "labels/<id>.png", "overlays": "overlays/<id>.png",
                        **({"probs": "probs/<id>.npz (float16, K x H x W)"}
                           if save_probs else {})},
            "ids": done,
        }
        (tmp / "predictions.json").write_text(json.dumps(summary, indent=2) + "\n")
        publish(tmp, out, OWNED)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def read_frame(student: Student, frame: Frame
          ) -> tuple[dict[str, np.ndarray], dict[str, tuple[float, float]]]:
    """A frame's stored arrays (and value ranges of float images): from a data set record
    with its label as evaluate reads it, else through the reader's label-free decoding."""
    label = frame.record.files.get("label") if frame.record is not None else None
    if frame.record is not None and label is not None and label.is_file():
        sample = student.reader.decode(frame.record)
        return dict(sample.modalities), dict(sample.ranges)
    return student.read(frame.files), {}
