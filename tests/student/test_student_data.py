"""The student's input conversion: fewer full-frame copies, the same numbers."""

import platform

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import interpolate

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


def _at_threads(threads, fn, *args, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bilinear_resize_has_the_same_bits_at_every_thread_count(dtype):
    """torch resizes a 3-channel float image with another kernel at one thread than at
    more; `resize_bilinear` gives one result, for contiguous and channels-last inputs (the
    readers' H x W x 3 arrays permuted), up- and downscaled, and keeps the input's layout."""
    from any2seg.datasets.resize import resize_bilinear

    gen = torch.Generator().manual_seed(5)
    for (h, w), (nh, nw) in [((57, 91), (130, 77)), ((200, 150), (96, 301)),
                             ((31, 40), (45, 50)), ((120, 120), (240, 240))]:
        x = torch.rand(1, 3, h, w, generator=gen, dtype=dtype) * 4 - 1
        for src in (x, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)):
            got = [_at_threads(t, resize_bilinear, src, nh, nw) for t in (1, 2, 3)]
            assert all(torch.equal(g, got[0]) for g in got[1:])
            assert got[0].shape == (1, 3, nh, nw) and got[0].dtype == dtype
            assert got[0].is_contiguous() == src.is_contiguous()
            ref = _at_threads(2, interpolate, src, size=(nh, nw), mode="bilinear",
                              align_corners=False)  # torch's generic kernel
            assert torch.allclose(got[0], ref, rtol=0, atol=1e-5 if dtype == torch.float32
                                  else 1e-12)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the fourth channel keeps torch's scalar loop where a SIMD "
                           "register holds more than 4 floats (x86)")
def test_bilinear_resize_gives_torchs_one_thread_numbers():
    """The numbers of a DataLoader worker (one thread), as the official loaders compute
    them: so `train.workers >= 1` trains the same weights as before the fix."""
    from any2seg.datasets.resize import resize_bilinear

    gen = torch.Generator().manual_seed(6)
    for (h, w), (nh, nw) in [((64, 64), (150, 137)), ((300, 211), (120, 97)),
                             ((40, 52), (30, 70))]:
        x = torch.rand(1, 3, h, w, generator=gen)
        one = _at_threads(1, interpolate, x, size=(nh, nw), mode="bilinear",
                          align_corners=False)
        assert torch.equal(_at_threads(2, resize_bilinear, x, nh, nw), one)


def test_training_items_have_the_same_bits_at_any_thread_and_worker_count(small_sample):
    """Augmented items (resize to crops large enough that torch splits reductions across
    threads, jitter and blur always on) are the same at 1 and 2 threads, and from the main
    process and from a loader worker: `train.workers` 0 and 1 train the same weights."""
    from any2seg import datasets
    from stages.student.data import ScheduleSampler

    root, _ = small_sample
    samples = datasets.load("sample", root, "train", modalities=MODALITIES)[:4]
    keys = [(0, i) for i in range(4)] + [(1, 2), (2, 3)]
    for crop in (64, 192):  # below and above the size torch reduces on one thread
        data = StudentData(samples, MODALITIES, None, crop,
                           AugmentConfig(jitter=1.0, blur=1.0), seed=11)
        one, two = ([_at_threads(t, data.__getitem__, k) for k in keys] for t in (1, 2))
        for a, b in zip(one, two, strict=True):
            assert torch.equal(a["images"], b["images"])
            assert torch.equal(a["label"], b["label"])

    def batches(workers):
        loader = torch.utils.data.DataLoader(
            data, batch_sampler=ScheduleSampler(len(data), 2, 3, 11), num_workers=workers)
        return list(loader)

    main, worker = _at_threads(2, batches, 0), _at_threads(2, batches, 1)
    for a, b in zip(main, worker, strict=True):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["label"], b["label"])


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
    DELIVER's multiples of 32) are the numbers of the old resize, to_unit and normalise
    on one thread (a loader worker's), at 1 and 2 threads (`resize_bilinear`)."""
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
                images = {m: _at_threads(1, old_resize, x, size, size, False)
                          for m, x in images.items()}
                label = old_resize(label, size, size, True)
            ref = torch.stack([old_normalise(m, old_to_unit(images[m])) for m in MODALITIES])
            assert item["images"].shape == (4, 3, 224, 224) and torch.equal(item["images"], ref)
            assert torch.equal(item["label"], torch.from_numpy(label))
        depth = (sample.modalities["depth"].astype(np.uint16) * 257)[:, :, 0]  # 16-bit, 2-D
        for nearest in (False, True):
            got = resize_tensor_like(depth, 97, 131, nearest)
            ref = _at_threads(1, old_resize, depth, 97, 131, nearest)
            assert got.dtype == ref.dtype and np.array_equal(got, ref)
    finally:
        torch.set_num_threads(before)
