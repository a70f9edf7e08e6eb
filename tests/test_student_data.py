"""The student's input conversion: fewer full-frame copies, the same numbers."""

import numpy as np
import pytest
import torch

from stages.student.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    StudentData,
    augment,
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
