"""The student's input conversion: fewer full-frame copies, the same numbers."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stages.student.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    StudentData,
    augment,
    nearest_window,
    to_unit,
)

MODALITIES = ["rgb", "depth", "event", "lidar"]


def old_to_unit(arr):
    """The conversion as it was: transpose, convert, divide, each into a new array."""
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32))
    return x / 255.0 if np.issubdtype(arr.dtype, np.integer) else x


def old_normalise(name, img):
    if name == "rgb":
        img = (img - torch.tensor(IMAGENET_MEAN)[:, None, None]) / \
            torch.tensor(IMAGENET_STD)[:, None, None]
    return img


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32, np.float64])
def test_to_unit_equals_the_three_copy_conversion(dtype):
    rng = np.random.default_rng(7)
    for shape in [(5, 7, 3), (64, 80, 3), (257, 131, 3)]:
        if np.issubdtype(dtype, np.integer):
            arr = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
        else:
            arr = (rng.standard_normal(shape) * 3).astype(dtype)
        got, ref = to_unit(arr), old_to_unit(arr)
        assert got.dtype == torch.float32 and got.is_contiguous() and torch.equal(got, ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_items_equal_the_old_conversion_bit_for_bit(small_sample, threads):
    """Training items (random resize, crop, flip, jitter, blur) and validation items are
    the numbers the old conversion gave, with 1 and 2 torch threads (the resize kernel
    torch picks depends on it, and on the input's memory layout, which must not change)."""
    from any2seg import datasets

    root, _ = small_sample
    samples = datasets.load("sample", root, "train", modalities=MODALITIES)[:3]
    cfg = AugmentConfig(jitter=0.5, blur=0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in (0, 3407):
            data = StudentData(samples, MODALITIES, None, 48, cfg, seed=seed)
            for epoch, index in [(0, 0), (1, 1), (2, 2), (-1, 0)]:
                item = data[(epoch, index)]
                sample = samples[index]
                images = {m: old_to_unit(sample.modalities[m]) for m in MODALITIES}
                label = torch.from_numpy(np.ascontiguousarray(sample.label))
                if epoch >= 0:
                    rng = np.random.default_rng([seed, epoch, index])
                    images, label = augment(images, label, 48, cfg, rng)
                ref = torch.stack([old_normalise(m, images[m]) for m in MODALITIES])
                assert item["images"].dtype == ref.dtype and torch.equal(item["images"], ref)
                assert torch.equal(item["label"], label.long())
    finally:
        torch.set_num_threads(before)


def old_window(src, size, top, left, crop, fill):
    """Resize the whole map through float with `nearest`, pad, crop (as augment did)."""
    x = F.interpolate(src[(None,) * (4 - src.dim())].double(), size=size, mode="nearest")
    x = x.reshape(*src.shape[:-2], *size).long()
    ph, pw = max(0, crop - size[0]), max(0, crop - size[1])
    x = F.pad(x, (0, pw, 0, ph), value=fill)
    return x[..., top:top + crop, left:left + crop]


def test_nearest_window_is_the_whole_resize_padded_and_cropped():
    """Labels (2-D) and teacher codes (C, H, W) up, down, equal, exactly 2x, odd sizes."""
    rng = np.random.default_rng(0)
    for h, w, nh, nw, crop in [(24, 32, 48, 64, 40), (37, 29, 61, 20, 33), (50, 50, 50, 50, 50),
                               (17, 23, 34, 46, 16), (100, 90, 33, 47, 64), (9, 13, 9, 31, 12)]:
        for src in (torch.from_numpy(rng.integers(0, 256, (h, w))),
                    torch.from_numpy(rng.integers(-1, 4096, (3, h, w)))):
            for _ in range(4):
                top = int(rng.integers(0, max(nh, crop) - crop + 1))
                left = int(rng.integers(0, max(nw, crop) - crop + 1))
                got = nearest_window(src, (nh, nw), top, left, crop, 255)
                ref = old_window(src, (nh, nw), top, left, crop, 255)
                assert got.dtype == torch.int64 and torch.equal(got, ref)


def old_resize(arr, height, width, nearest):
    """protocol.resize_tensor_like as it was: a copy, float32, interpolate, np.round."""
    if arr.shape[:2] == (height, width):
        return arr
    integer = np.issubdtype(arr.dtype, np.integer)
    x = torch.from_numpy(np.array(arr if arr.ndim == 3 else arr[:, :, None])).permute(2, 0, 1)
    x = x[None].to(torch.float32) if integer else x[None]
    x = F.interpolate(x, size=(height, width), mode="nearest" if nearest else "bilinear",
                      **({} if nearest else {"align_corners": False}))
    out = x[0].permute(1, 2, 0).numpy()
    if integer:
        out = np.round(out).astype(arr.dtype)
    return out if arr.ndim == 3 else out[:, :, 0]


@pytest.mark.parametrize("threads", [1, 2])
def test_official_protocol_items_equal_the_old_conversion(small_sample, threads):
    """Validation items under the official resize (down to 200 px, then up to 224, as
    DELIVER's multiples of 32) are the numbers of the old resize, to_unit and normalise."""
    from any2seg import datasets
    from stages.student.protocol import _OfficialResize, resize_tensor_like

    root, _ = small_sample
    samples = datasets.load("sample", root, "val", modalities=MODALITIES)[:2]
    transform = _OfficialResize(200)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = StudentData(samples, MODALITIES, None, None, AugmentConfig(), 0,
                           transform=transform)
        for index in range(len(samples)):
            item = data[(-1, index)]
            sample = samples[index]
            images, label = dict(sample.modalities), sample.label
            for size in (200, 224):
                images = {m: old_resize(x, size, size, False) for m, x in images.items()}
                label = old_resize(label, size, size, True)
            ref = torch.stack([old_normalise(m, old_to_unit(images[m])) for m in MODALITIES])
            assert item["images"].shape == (4, 3, 224, 224) and torch.equal(item["images"], ref)
            assert torch.equal(item["label"], torch.from_numpy(label))
        depth = (sample.modalities["depth"].astype(np.uint16) * 257)[:, :, 0]  # 16-bit, 2-D
        for nearest in (False, True):
            got, ref = resize_tensor_like(depth, 97, 131, nearest), old_resize(depth, 97, 131,
                                                                              nearest)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)
    finally:
        torch.set_num_threads(before)
