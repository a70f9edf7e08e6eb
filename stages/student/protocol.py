"""Evaluation protocols: at which resolution a data set's predictions are scored, and
what a missing sensor is, so numbers can sit next to published ones.

- `official`: as the official evaluation code of the data set. DELIVER
  (jamycheung/DELIVER `tools/val_mm.py` with `get_val_augmentation(EVAL.IMAGE_SIZE)`,
  `semseg/augmentations_mm.py` `Resize`): every image and the label are resized so the
  short side is 1024 (then up to a multiple of 32), images bilinear, label nearest, as
  torchvision 0.10 resizes tensors (no antialiasing; integer images rounded back to
  their dtype), before inference and scoring. MCubeS: the reader already delivers the
  official `FixScaleCrop(1024)` frame, so nothing more happens. A missing sensor is a
  black frame (`missing: black`, RuipingL/MISS).
- `native`: the images and labels as the reader returns them; a missing sensor is
  handled as the checkpoint was trained (`student.missing`).

The default is the reader's `eval_protocol`: `official` for deliver and mcubes, `native`
for the generated sample (256 px: the official 1024 resize would upsample it 4x, and no
official code exists for it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from any2seg import datasets
from any2seg.datasets.resize import resize_bilinear
from any2seg.errors import PipelineError
from stages.student.data import Transform, nearest_index

PROTOCOLS = ("official", "native")


def default_protocol(dataset: str) -> str:
    return getattr(datasets.get(dataset), "eval_protocol", "native")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise PipelineError(f"eval.protocol must be one of {', '.join(PROTOCOLS)}, got "
                            f"{protocol!r}")
    return protocol


def default_missing(protocol: str) -> str | None:
    """`black` under the official protocol (MISS), else None (the checkpoint's mode)."""
    return "black" if protocol == "official" else None


def resize_tensor_like(arr: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
    """torchvision 0.10 `TF.resize` on a tensor (DELIVER's environment.yaml pins it):
    interpolate in float32 (float64 stays), bilinear with align_corners=False and no
    antialiasing or nearest, then integer images are rounded back to their dtype.

    Nearest on integer arrays (labels) is a gather of torch's own source indices: the
    values torch's float32 round trip gives for every integer up to 2**24, without
    converting the frame. Bilinear keeps the float32 frame in the memory layout it always
    had (channels last: torch picks its kernel by layout and thread count) and rounds in
    place."""
    if arr.shape[:2] == (height, width):
        return arr
    integer = np.issubdtype(arr.dtype, np.integer)
    if nearest and integer:
        rows = nearest_index(arr.shape[0], height)
        cols = nearest_index(arr.shape[1], width)
        return arr[rows[:, None], cols]
    src = arr if arr.ndim == 3 else arr[:, :, None]
    if not (src.flags.writeable and src.flags.c_contiguous):
        src = np.array(src)  # torch.from_numpy warns on a read-only array; the layout
        # np.array gives is the one this function always fed torch
    x = torch.from_numpy(src).permute(2, 0, 1)[None]
    x = x.to(torch.float32) if integer or x.dtype not in (torch.float32, torch.float64) else x
    if nearest:
        x = F.interpolate(x, size=(height, width), mode="nearest")
    else:
        x = resize_bilinear(x, height, width)  # the same bits at every thread count
    out = x[0].permute(1, 2, 0).numpy()
    if integer:  # np.rint: half to even, as torch.round and np.round
        out = np.rint(out, out=out).astype(arr.dtype)
    return out if arr.ndim == 3 else out[:, :, 0]


def official_resize(arrays: dict[str, np.ndarray], label: np.ndarray | None,
                    size: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """DELIVER `augmentations_mm.Resize.__call__` (lines 288-312): scale = size / short
    side, (round(H * scale), round(W * scale)), then up to multiples of 32. Without a
    label (prediction on new frames) the images' common size is the frame's."""
    h, w = label.shape if label is not None else next(iter(arrays.values())).shape[:2]
    scale = size / min(h, w)
    nh, nw = round(h * scale), round(w * scale)
    ah, aw = int(math.ceil(nh / 32)) * 32, int(math.ceil(nw / 32)) * 32
    for th, tw in ((nh, nw), (ah, aw)):
        arrays = {m: resize_tensor_like(x, th, tw, nearest=False) for m, x in arrays.items()}
        if label is not None:
            label = resize_tensor_like(label, th, tw, nearest=True)
    return arrays, label


def protocol_transform(protocol: str, dataset: str) -> Transform | None:
    """What the protocol does to a sample's arrays and label before inference, or None."""
    check_protocol(protocol)
    size = getattr(datasets.get(dataset), "official_eval_size", None)
    if protocol == "native" or size is None:
        return None
    return _OfficialResize(size)


class _OfficialResize:
    """`official_resize` at a fixed size (a class, so DataLoader workers can pickle it)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, arrays: dict[str, np.ndarray], label: np.ndarray | None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        return official_resize(arrays, label, self.size)

    def __repr__(self) -> str:
        return f"official resize (short side {self.size}, multiples of 32)"
