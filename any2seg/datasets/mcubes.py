"""MCubeS reader, following DELIVER/CMNeXt's `semseg/datasets/mcubes.py`.

Layout: root/{polL_color,polL_aolp_sin,polL_aolp_cos,polL_dolp,NIR_warped,GT,list_folder}.
Values as the official `__getitem__` feeds the model (lines 88-99): RGB 8-bit (value / 255
later, like every uint8 image) or 16-bit -> float32 / 65535; AoLP the raw float sin/cos
stacked as [sin, cos, sin] (in [-1, 1]); DoLP the raw float map repeated to 3 channels;
NIR 8-bit, or 16-bit -> float32 / 65535, repeated to 3 channels. Nothing is quantised.
Frame as the official evaluation: columns from 192 on (line 103), then `FixScaleCrop(1024)`
(lines 388-451): short side resized to 1024 (a no-op on the 1024-row frames) and a centre
crop of 1024 x 1024, i.e. columns 196..1219 of the 1224-wide frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
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
from any2seg.datasets.decode import read_npy, read_png, resize_nearest, to_rgb3
from any2seg.datasets.packed import PackedPath, as_root
from any2seg.datasets.registry import DatasetReader, register
from any2seg.errors import DatasetError

CLASSES = (
    "asphalt", "concrete", "metal", "road_marking", "fabric", "glass", "plaster", "plastic",
    "rubber", "sand", "gravel", "ceramic", "cobblestone", "brick", "grass", "wood", "leaf",
    "water", "human", "sky",
)
PALETTE = (
    (44, 160, 44), (31, 119, 180), (255, 127, 14), (214, 39, 40), (140, 86, 75),
    (127, 127, 127), (188, 189, 34), (255, 152, 150), (23, 190, 207), (174, 199, 232),
    (196, 156, 148), (197, 176, 213), (247, 182, 210), (199, 199, 199), (219, 219, 141),
    (158, 218, 229), (57, 59, 121), (107, 110, 207), (156, 158, 222), (99, 121, 57),
)
MODALITIES = ("rgb", "aolp", "dolp", "nir")
SPLITS = ("train", "val", "test")
LEFT_CROP = 192  # official `self._left_offset`
FRAME = 1024  # official `FixScaleCrop(crop_size=1024)` of the val transform
AOLP_RANGE = (-1.0, 1.0)

_FILES = {
    "rgb": [("rgb", "polL_color", ".png")],
    "aolp": [("aolp_sin", "polL_aolp_sin", ".npy"), ("aolp_cos", "polL_aolp_cos", ".npy")],
    "dolp": [("dolp", "polL_dolp", ".npy")],
    "nir": [("nir", "NIR_warped", ".png")],
}
_LABEL_VALID = np.zeros(256, dtype=bool)
_LABEL_VALID[: len(CLASSES)] = True
_LABEL_VALID[255] = True


def _float_map(x: np.ndarray, path: Path) -> np.ndarray:
    """A 2-D float map as stored (integer maps become float32, as the official ToTensor)."""
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype,
                                                                            np.complexfloating):
        raise DatasetError(f"{path} holds a {x.dtype} array of shape {x.shape}; "
                           "expected a 2-D real H x W map")
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def _png_image(path: Path) -> np.ndarray:
    """RGB / NIR PNG as the official cv2 path scales it: 8-bit stays uint8 (the student
    divides by 255), 16-bit becomes float32 / 65535 (official lines 89 and 98)."""
    img = to_rgb3(read_png(path), path, keep_16bit=True)
    if img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(65535)
    return img


def fix_scale_crop(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    """Official `FixScaleCrop.__call__` (mcubes.py:401-418): the resized size (oh, ow),
    short side = `crop`, and the top-left (y1, x1) of the centre crop (Python `round`)."""
    if width > height:
        oh, ow = crop, int(1.0 * width * crop / height)
    else:
        ow, oh = crop, int(1.0 * height * crop / width)
    return oh, ow, int(round((oh - crop) / 2.0)), int(round((ow - crop) / 2.0))


def _resize_linear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """cv2.resize INTER_LINEAR on a float image (half-pixel centres, no antialiasing),
    which is torch's bilinear with align_corners=False."""
    import torch

    from any2seg.datasets.resize import resize_bilinear

    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]  # a writable copy
    out = resize_bilinear(x, height, width)  # the same bits at every thread count
    return out[0].permute(1, 2, 0).numpy()


class MCubesReader(DatasetReader):
    name = "mcubes"
    classes: ClassVar[tuple[str, ...]] = CLASSES
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = PALETTE
    modalities: ClassVar[tuple[str, ...]] = MODALITIES
    splits: ClassVar[tuple[str, ...]] = SPLITS
    default_root = "data/MCubeS/multimodal_dataset"
    # the reader already delivers the official evaluation frame: no resize at evaluation
    eval_protocol = "official"
    every_file_options: ClassVar[dict[str, Any]] = {"cmnext_val": False}
    layout: ClassVar[str] = ("list_folder/<split>.txt naming images that lie in polL_color/, "
                             "polL_aolp_sin/, polL_aolp_cos/, polL_dolp/, NIR_warped/ and GT/")

    def _check_root(self, root: Path | PackedPath) -> None:
        if not root.is_dir():
            raise DatasetError(f"mcubes root {root} does not exist; download MCubeS "
                               "(kyotovision-public/multimodal-material-segmentation) and pass "
                               "its multimodal_dataset folder as --root")
        if not (root / "list_folder").is_dir():
            nested = [p.parent for p in root.glob("*/list_folder")]
            hint = f" (did you mean --root {nested[0]}?)" if nested else ""
            raise DatasetError(f"{root} is not an MCubeS root: expected {root}/list_folder/"
                               "{train,val,test}.txt beside polL_color/, polL_aolp_sin/, "
                               f"polL_aolp_cos/, polL_dolp/, NIR_warped/, GT/{hint}")

    def _list(self, root: Path | PackedPath, split: str, cmnext_val: bool) -> list[str]:
        list_name = "test" if (split == "val" and cmnext_val) else split
        path = root / "list_folder" / f"{list_name}.txt"
        if not path.is_file():
            raise DatasetError(f"missing split list {path}; MCubeS ships list_folder/"
                               "{train,val,test}.txt")
        names = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                names.append(line.split()[0])
        return names

    def index(self, root: Path, split: str | Sequence[str] = "train", *,
              modalities: Sequence[str] = MODALITIES, cmnext_val: bool = True) -> list[Record]:
        root = as_root(root)
        self._check_root(root)
        splits = as_list(split) or list(SPLITS)
        for s in splits:
            if s not in SPLITS:
                raise DatasetError(f"unknown split {s!r}; MCubeS splits: {', '.join(SPLITS)}")
        modalities = list(modalities)
        for m in modalities:
            if m not in MODALITIES:
                raise DatasetError(f"unknown modality {m!r}; MCubeS modalities: "
                                   f"{', '.join(MODALITIES)}")
        if not modalities or len(set(modalities)) != len(modalities):
            raise DatasetError(f"modalities must be a non-empty list without repeats, "
                               f"got {modalities}")
        records = []
        for s in splits:
            for name in self._list(root, s, cmnext_val):
                files = {key: root / folder / f"{name}{ext}"
                         for m in modalities for key, folder, ext in _FILES[m]}
                files["label"] = root / "GT" / f"{name}.png"
                records.append(Record(id=f"{s}/{name}", split=s, files=files))
        return records

    def pack_index(self, root: Path, split: str, modalities: Sequence[str] | None = None
                   ) -> tuple[list[list[Record]], list[Path]]:
        """The split's own list (`cmnext_val=False`) and its files; the list file itself is
        packed too, so the pack indexes exactly like the folder."""
        records = self.index(root, split, modalities=list(modalities or MODALITIES),
                             cmnext_val=False)
        return [records], [Path(root) / "list_folder" / f"{split}.txt"]

    def decode(self, record: Record, crop_left: int = LEFT_CROP,
               frame: int | None = FRAME) -> Sample:
        """One sample in the official evaluation frame (`frame=None`: columns `crop_left`
        onward, the frame the official loader hands its transforms)."""
        f = record.files
        raw_label = read_png(f["label"])
        if raw_label.ndim == 3:
            raw_label = raw_label[:, :, 0]
        if raw_label.dtype != np.uint8:
            raise DatasetError(f"label {f['label']} is {raw_label.dtype}; expected 8-bit")
        check_label_range(raw_label, _LABEL_VALID, f["label"], "0..19 and 255 (MCubeS)")
        full_shape = raw_label.shape
        images: dict[str, np.ndarray] = {}
        if "rgb" in f:
            images["rgb"] = _png_image(f["rgb"])
        if "aolp_sin" in f:
            sin = _float_map(read_npy(f["aolp_sin"]), f["aolp_sin"])
            cos = _float_map(read_npy(f["aolp_cos"]), f["aolp_cos"])
            if sin.shape != cos.shape:
                raise DatasetError(f"{f['aolp_cos']} is {cos.shape} but {f['aolp_sin']} is "
                                   f"{sin.shape}")
            images["aolp"] = np.stack([sin, cos, sin], axis=2)
        if "dolp" in f:
            d = _float_map(read_npy(f["dolp"]), f["dolp"])
            images["dolp"] = np.stack([d, d, d], axis=2)
        if "nir" in f:
            images["nir"] = _png_image(f["nir"])
        for m in (k for k in MODALITIES if k in images):
            if images[m].shape[:2] != full_shape:
                raise DatasetError(f"{m} of {record.id} is {images[m].shape[:2]} but the label "
                                   f"{f['label']} is {full_shape}; all must match")
        label = raw_label[:, crop_left:]
        images = {m: images[m][:, crop_left:] for m in MODALITIES if m in images}
        if frame:
            h, w = label.shape
            oh, ow, y1, x1 = fix_scale_crop(h, w, frame)
            if (oh, ow) != (h, w):  # not on real MCubeS (1024 rows); images are float there
                images = {m: _resize_linear(x if np.issubdtype(x.dtype, np.floating)
                                            else x.astype(np.float32) / np.float32(255), oh, ow)
                          for m, x in images.items()}
                label = resize_nearest(label, oh, ow)
            images = {m: x[y1:y1 + frame, x1:x1 + frame] for m, x in images.items()}
            label = label[y1:y1 + frame, x1:x1 + frame]
        return Sample(id=record.id,
                      modalities={m: np.ascontiguousarray(x) for m, x in images.items()},
                      label=label.astype(np.int64), files=dict(f),
                      ranges={"aolp": AOLP_RANGE} if "aolp" in images else {})

    def load(self, root: Path | str | None = None, split: str | Sequence[str] = "train", *,
             modalities: Sequence[str] = MODALITIES, cmnext_val: bool = True,
             crop_left: int = LEFT_CROP, frame: int | None = FRAME,
             skip_bad: bool = False) -> SampleSequence:
        """Samples of `split`. With `cmnext_val` (default) "val" reads `test.txt`, as CMNeXt
        and the published MCubeS numbers do. `frame` is the official `FixScaleCrop` size
        (1024); None keeps every column from `crop_left` on."""
        root = as_root(root or self.default_root)
        modalities = list(modalities)
        if frame is not None and frame < 1:
            raise DatasetError(f"frame must be a positive size or None, got {frame}")
        records = self.index(root, split, modalities=modalities, cmnext_val=cmnext_val)
        decode = partial(self._decode_ordered, modalities=tuple(modalities), crop_left=crop_left,
                         frame=frame)
        return finish(self.name, records, decode, CLASSES, modalities, skip_bad)

    def _decode_ordered(self, record: Record, modalities: tuple[str, ...],
                        crop_left: int, frame: int | None = FRAME) -> Sample:
        """`decode` with modalities in the requested order (a method, so it pickles)."""
        sample = self.decode(record, crop_left, frame)
        sample.modalities = {m: sample.modalities[m] for m in modalities}
        return sample

    def info(self, root: Path | str | None = None) -> dict[str, Any]:
        root = as_root(root or self.default_root)
        self._check_root(root)
        splits = {}
        for s in SPLITS:
            list_name = s
            path = root / "list_folder" / f"{list_name}.txt"
            if not path.is_file():
                splits[s] = {"samples": 0, "conditions": {}, "cases": {}, "missing_files": {}}
                continue
            records = self.index(root, s, cmnext_val=False)
            missing: dict[str, int] = {}
            for r in records:
                for kind, p in r.files.items():
                    if not p.is_file():
                        missing[kind] = missing.get(kind, 0) + 1
            splits[s] = {"samples": len(records), "conditions": {}, "cases": {},
                         "missing_files": dict(sorted(missing.items()))}
        return {
            "dataset": self.name, "root": str(root), "format": "mcubes",
            "total": sum(v["samples"] for v in splits.values()), "splits": splits,
            "modalities": list(MODALITIES), "num_classes": len(CLASSES),
            "classes": list(CLASSES), "ignore_index": 255,
            "note": "load(split='val') reads list_folder/test.txt by default (cmnext_val=True), "
                    "as CMNeXt and the published numbers do",
        }


MCUBES = register(MCubesReader())
