import numpy as np
import pytest

from any2seg.errors import PipelineError
from stages.student.protocol import (
    default_missing,
    default_protocol,
    official_resize,
    protocol_transform,
    resize_tensor_like,
)


def test_official_resize_size_follows_val_mm():
    """jamycheung/DELIVER tools/val_mm.py:127 (`get_val_augmentation(EVAL.IMAGE_SIZE)`,
    configs/deliver_rgbdel.yaml IMAGE_SIZE [1024, 1024]) and semseg/augmentations_mm.py:
    288-312: scale = 1024 / short side, round, then up to multiples of 32. DELIVER's
    1042 x 1042 frames are scored at 1024 x 1024."""
    img = np.zeros((1042, 1042, 3), np.uint8)
    arrays, label = official_resize({"rgb": img}, np.zeros((1042, 1042), np.int64), 1024)
    assert arrays["rgb"].shape == (1024, 1024, 3) and label.shape == (1024, 1024)
    # a non-square frame: round(14 * 8 / 10) = 11, then 32-aligned
    arrays, label = official_resize({"rgb": np.zeros((10, 14, 3), np.uint8)},
                                    np.zeros((10, 14), np.int64), 8)
    assert arrays["rgb"].shape == (32, 32, 3) and label.shape == (32, 32)
    # round(151 * 64 / 100) = round(96.64) = 97 -> 128 (truncating would give 96)
    arrays, label = official_resize({"rgb": np.zeros((100, 151, 3), np.uint8)},
                                    np.zeros((100, 151), np.int64), 64)
    assert arrays["rgb"].shape == (64, 128, 3) and label.shape == (64, 128)


def test_half_size_bilinear_rounds_like_torchvision_on_uint8():
    """Halving with `TF.resize(..., BILINEAR)` on a uint8 tensor (torchvision 0.10, DELIVER
    environment.yaml): half-pixel bilinear = mean of each 2 x 2 block, computed in float and
    rounded half to even back to uint8; the label (`NEAREST`) keeps each block's top-left."""
    blocks = [(0, 1, 0, 0), (1, 1, 1, 0), (1, 0, 1, 0), (3, 3, 0, 0), (2, 2, 2, 3), (9, 0, 0, 0)]
    expected = [0, 1, 0, 2, 2, 2]  # means .25 .75 .5 1.5 2.25 2.25
    img = np.zeros((2, 2 * len(blocks), 3), np.uint8)
    for i, (a, b, c, d) in enumerate(blocks):
        img[:, 2 * i:2 * i + 2] = np.array([[a, b], [c, d]])[:, :, None]
    label = np.arange(2 * 2 * len(blocks)).reshape(2, -1) % 7
    out = resize_tensor_like(img, 1, len(blocks), nearest=False)
    assert out.dtype == np.uint8 and out[0, :, 0].tolist() == expected
    assert resize_tensor_like(label, 1, len(blocks), nearest=True)[0].tolist() == \
        label[0, ::2].tolist()
    depth = (img.astype(np.uint16) * 5001)  # MISS's 16-bit depth is rounded in uint16
    out16 = resize_tensor_like(depth, 1, len(blocks), nearest=False)
    assert out16.dtype == np.uint16  # 1250.25, 3750.75, 2500.5, 7501.5, 11252.25, 11252.25
    assert out16[0, :, 0].tolist() == [1250, 3751, 2500, 7502, 11252, 11252]
    aolp = img.astype(np.float32) / 4  # float images are not rounded
    assert resize_tensor_like(aolp, 1, len(blocks), nearest=False)[0, :, 0].tolist() == \
        [0.0625, 0.1875, 0.125, 0.375, 0.5625, 0.5625]


def test_defaults_per_dataset():
    """DELIVER and MCubeS default to their official protocol with black missing frames;
    the generated sample is scored at its own size with the checkpoint's missing mode."""
    assert default_protocol("deliver") == default_protocol("mcubes") == "official"
    assert default_protocol("sample") == "native"
    assert default_missing("official") == "black" and default_missing("native") is None
    assert protocol_transform("official", "deliver") is not None
    assert protocol_transform("official", "sample") is not None  # asked for explicitly
    assert protocol_transform("official", "mcubes") is None  # the reader's frame is official
    assert protocol_transform("native", "deliver") is None
    with pytest.raises(PipelineError, match="eval.protocol must be one of official, native"):
        protocol_transform("paper", "deliver")
