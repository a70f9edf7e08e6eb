"""DELIVER reader, following the official loader (`semseg/datasets/deliver.py`).

Layout: root/{img,hha,depth,event,lidar,semantic}/<condition>/<split>/<scene>/
<frame>_<kind>_front.png. Labels are the red channel, raw 1..25 -> classes 0..24,
raw 0 and 255 -> ignore. Sensor-failure cases are scene-name suffixes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from any2seg.datasets.base import (
    Record,
    Sample,
    SampleSequence,
    as_list,
    check_label_range,
    finish,
)
from any2seg.datasets.decode import read_png, resize_nearest, to_rgb3
from any2seg.datasets.packed import PackedPath, as_root, listdir, subdirs
from any2seg.datasets.registry import DatasetReader, register
from any2seg.deliver_taxonomy import (  # noqa: F401  (the reader's public names)
    CASES,
    CLASSES,
    CONDITIONS,
    MODALITIES,
    PALETTE,
    SPLITS,
)
from any2seg.errors import DatasetError

# modality -> (top-level folder, file kind); depth's folder depends on `depth_source`.
_FOLDERS = {"rgb": ("img", "rgb"), "event": ("event", "event"), "lidar": ("lidar", "lidar"),
            "label": ("semantic", "semantic")}
_DEPTH_FOLDERS = {"hha": "hha", "raw": "depth"}
_CLEAN = "none"

# raw label value -> class index (ignore for 0, 255 and anything unexpected)
_LABEL_LUT = np.full(256, 255, dtype=np.int64)
_LABEL_LUT[1:26] = np.arange(25)
_LABEL_VALID = np.zeros(256, dtype=bool)
_LABEL_VALID[[0, 255]] = True
_LABEL_VALID[1:26] = True


def scene_case(scene: str) -> str | None:
    """Sensor-failure case encoded as the scene-name suffix, or None for a clean scene."""
    for case in CASES:
        if scene.endswith("_" + case):
            return case
    return None


def decode_label(raw: np.ndarray, path: Path) -> np.ndarray:
    """Red channel -> int64 classes 0..24, ignore 255; refuses values outside 0..25/255."""
    red = raw[:, :, 0] if raw.ndim == 3 else raw
    if red.dtype != np.uint8:
        raise DatasetError(f"label {path} is {red.dtype}; DELIVER labels are 8-bit PNGs")
    check_label_range(red, _LABEL_VALID, path, "0..25 and 255 (DELIVER raw label ids)")
    return _LABEL_LUT[red]


class DeliverReader(DatasetReader):
    """Reads any root in the DELIVER layout (the real data set or a generated one)."""

    classes: ClassVar[tuple[str, ...]] = CLASSES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    splits: ClassVar[tuple[str, ...]] = SPLITS
    depth_sources: ClassVar[tuple[str, ...]] = tuple(_DEPTH_FOLDERS)
    layout: ClassVar[str] = ("img/<condition>/<split>/<scene>/<frame>_rgb_front.png with the "
                             "same paths under hha/, event/, lidar/ and semantic/")
    # official tools/val_mm.py: Resize(EVAL.IMAGE_SIZE=[1024, 1024]) before inference
    official_eval_size: ClassVar[int | None] = 1024

    def __init__(self, name: str = "deliver", default_root: str = "data/DELIVER",
                 how_to_get: str = "download DELIVER (github.com/jamycheung/DELIVER) "
                                   "and pass its folder as --root",
                 eval_protocol: str = "official") -> None:
        self.name = name
        self.default_root = default_root
        self.how_to_get = how_to_get
        self.eval_protocol = eval_protocol

    # -- indexing ---------------------------------------------------------------------
    def _check_root(self, root: Path | PackedPath) -> None:
        if not root.exists():
            raise DatasetError(f"{self.name} root {root} does not exist; {self.how_to_get}")
        if not root.is_dir():
            raise DatasetError(f"{self.name} root {root} is not a directory")
        if not (root / "img").is_dir():
            nested = [p.parent for p in root.glob("*/img")]
            hint = f" (did you mean --root {nested[0]}?)" if nested else ""
            found = ", ".join(subdirs(root)[:6]) or "nothing"
            raise DatasetError(
                f"{root} is not a DELIVER root: expected {root}/img/<condition>/<split>/"
                f"<scene>/<frame>_rgb_front.png next to hha/, event/, lidar/, semantic/; "
                f"found {found}{hint}")

    def index(self, root: Path, split: str | Sequence[str] = "train", *,
              modalities: Sequence[str] = MODALITIES, condition: str | Sequence[str] | None = None,
              case: str | Sequence[str] | None = None, depth_source: str = "hha",
              view: str = "front") -> list[Record]:
        """Every sample of the requested splits in the official (sorted path) order."""
        root = as_root(root)
        self._check_root(root)
        splits = as_list(split) or list(SPLITS)
        for s in splits:
            if s not in SPLITS:
                raise DatasetError(f"unknown split {s!r}; DELIVER splits: {', '.join(SPLITS)}")
        modalities = list(modalities)
        for m in modalities:
            if m not in MODALITIES:
                raise DatasetError(f"unknown modality {m!r}; DELIVER modalities: "
                                   f"{', '.join(MODALITIES)}")
        if len(set(modalities)) != len(modalities) or not modalities:
            raise DatasetError(f"modalities must be a non-empty list without repeats, "
                               f"got {modalities}")
        if depth_source not in _DEPTH_FOLDERS:
            raise DatasetError(f"depth_source must be one of {', '.join(_DEPTH_FOLDERS)}, "
                               f"got {depth_source!r}")
        conditions = as_list(condition)
        cases = as_list(case)
        if cases is not None:
            for c in cases:
                if c not in (*CASES, _CLEAN):
                    raise DatasetError(f"unknown case {c!r}; cases: {', '.join(CASES)}, "
                                       f"or '{_CLEAN}' for scenes without a sensor failure")
        folders = {m: _FOLDERS[m] for m in modalities if m != "depth"}
        if "depth" in modalities:
            folders["depth"] = (_DEPTH_FOLDERS[depth_source], "depth")
        suffix = f"_rgb_{view}.png"

        records: list[Record] = []
        available_conditions = subdirs(root / "img")
        if conditions is not None:
            unknown = [c for c in conditions if c not in available_conditions]
            if unknown:
                raise DatasetError(f"condition {unknown[0]!r} not found under {root / 'img'}; "
                                   f"present: {', '.join(available_conditions) or 'none'}")
        for s in splits:
            split_records = []
            for cond in conditions or available_conditions:
                for scene in subdirs(root / "img" / cond / s):
                    scene_c = scene_case(scene)
                    if cases is not None and (scene_c or _CLEAN) not in cases:
                        continue
                    scene_dir = root / "img" / cond / s / scene
                    for fname in sorted(listdir(scene_dir)):
                        if not fname.endswith(suffix):
                            continue
                        frame = fname[: -len(suffix)]
                        rel = Path(cond) / s / scene
                        files = {}
                        for m in modalities:
                            top, kind = folders[m]
                            files[m] = root / top / rel / f"{frame}_{kind}_{view}.png"
                        files["label"] = root / "semantic" / rel / f"{frame}_semantic_{view}.png"
                        # the official loader's order: sorted RGB path strings
                        key = f"img/{cond}/{s}/{scene}/{fname}"
                        split_records.append((key, Record(
                            id=f"{cond}/{s}/{scene}/{frame}", split=s, files=files,
                            condition=cond, case=scene_c)))
            records.extend(r for _, r in sorted(split_records, key=lambda kr: kr[0]))
        return records

    def pack_index(self, root: Path, split: str, modalities: Sequence[str] | None = None
                   ) -> tuple[list[list[Record]], list[Path]]:
        """HHA records, plus the raw `depth/` files when the root has them (both depth
        sources stay readable from the pack)."""
        modalities = list(modalities or MODALITIES)
        variants = [self.index(root, split, modalities=modalities)]
        if "depth" in modalities and (Path(root) / "depth").is_dir():
            variants.append(self.index(root, split, modalities=["depth"], depth_source="raw"))
        return variants, []

    # -- decoding ---------------------------------------------------------------------
    @staticmethod
    def _read_images(files: dict[str, Path]) -> tuple[dict[str, np.ndarray],
                                                      dict[str, np.ndarray]]:
        """Every image file of a frame as stored (16-bit kept) and, for 16-bit ones, raw."""
        images: dict[str, np.ndarray] = {}
        raw: dict[str, np.ndarray] = {}
        for m, path in files.items():
            if m == "label":
                continue
            stored = read_png(path)
            if stored.dtype == np.uint16:
                raw[m] = stored
            images[m] = to_rgb3(stored, path, keep_16bit=True)  # MISS: read_image keeps uint16
        return images, raw

    def decode_inputs(self, files: dict[str, Path]) -> dict[str, np.ndarray]:
        """A frame's images without a label, as `decode` makes them: event brought to the
        others' size by the official nearest resize; the others must agree."""
        images, _ = self._read_images(files)
        sizes = {img.shape[:2] for m, img in images.items() if m != "event"}
        if len(sizes) > 1:
            shown = ", ".join(f"{m} {files[m]} is {img.shape[1]}x{img.shape[0]}"
                              for m, img in images.items() if m != "event")
            raise DatasetError(f"the images of one frame differ in size ({shown}); all "
                               "modalities but event must have one size")
        if sizes and "event" in images:
            (height, width), = sizes
            images["event"] = resize_nearest(images["event"], height, width)
        return images

    def decode(self, record: Record) -> Sample:
        label_raw = read_png(record.files["label"])
        label = decode_label(label_raw, record.files["label"])
        height, width = label.shape
        images, raw = self._read_images(record.files)
        sizes = {img.shape[:2] for m, img in images.items() if m != "event"}
        if len(sizes) == 1 and sizes != {(height, width)}:  # the images agree: the label is off
            (h, w), = sizes
            raise DatasetError(
                f"label {record.files['label']} is {width}x{height} but its images are {w}x{h}; "
                "the label must match the image size")
        for m, img in images.items():
            if img.shape[:2] != (height, width):
                if m == "event":
                    images[m] = resize_nearest(img, height, width)
                else:
                    raise DatasetError(
                        f"{m} image {record.files[m]} is {img.shape[1]}x{img.shape[0]} but the "
                        f"label is {width}x{height}; all modalities but event must match the "
                        "label size")
        return Sample(id=record.id, modalities=images, label=label,
                      condition=record.condition, case=record.case, files=dict(record.files),
                      raw=raw)

    def load(self, root: Path | str | None = None, split: str | Sequence[str] = "train", *,
             modalities: Sequence[str] = MODALITIES, condition: str | Sequence[str] | None = None,
             case: str | Sequence[str] | None = None, depth_source: str = "hha",
             view: str = "front", skip_bad: bool = False) -> SampleSequence:
        """Samples of `split` (one or several, comma-separated) with the given filters.

        `depth_source="hha"` reads `hha/` like the official DELIVER loader; `"raw"` reads the
        metric `depth/` PNGs instead, as MISS does: 16-bit files stay uint16, so the student
        sees value / 255 exactly like MISS's `io.read_image(...).float() / 255` (up to 257),
        and `Sample.raw["depth"]` holds the 2-D stored array for metric use.
        """
        root = as_root(root or self.default_root)
        records = self.index(root, split, modalities=modalities, condition=condition,
                             case=case, depth_source=depth_source, view=view)
        return finish(self.name, records, self.decode, CLASSES, modalities, skip_bad)

    # -- summary ----------------------------------------------------------------------
    def info(self, root: Path | str | None = None) -> dict[str, Any]:
        """Counts per split, condition and case, and per-modality missing files."""
        root = as_root(root or self.default_root)
        self._check_root(root)
        has_raw = (root / "depth").is_dir()
        splits: dict[str, Any] = {}
        total = 0
        for s in SPLITS:
            records = self.index(root, s)
            conditions = Counter(r.condition for r in records)
            cases = Counter(r.case or _CLEAN for r in records)
            missing = Counter(kind for r in records for kind, p in r.files.items()
                              if not p.is_file())
            if has_raw:
                raw = self.index(root, s, modalities=["depth"], depth_source="raw")
                missing["depth_raw"] = sum(not r.files["depth"].is_file() for r in raw)
            splits[s] = {
                "samples": len(records),
                "conditions": {c: conditions.get(c, 0) for c in
                               sorted(set(CONDITIONS) | set(conditions))},
                "cases": {c: cases.get(c, 0) for c in (_CLEAN, *CASES)},
                "scenes": len({r.id.rsplit("/", 1)[0] for r in records}),
                "missing_files": {k: v for k, v in sorted(missing.items()) if v},
            }
            total += len(records)
        return {
            "dataset": self.name, "root": str(root), "format": "deliver",
            "total": total, "splits": splits,
            "modalities": list(MODALITIES), "depth_sources": ["hha"] + (["raw"] if has_raw else []),
            "num_classes": len(CLASSES), "classes": list(CLASSES), "ignore_index": 255,
        }


DELIVER = register(DeliverReader())
