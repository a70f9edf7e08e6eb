import numpy as np
from PIL import Image

from any2seg import datasets
from any2seg.datasets.mcubes import fix_scale_crop
from tests.layouts import MCUBES_H, MCUBES_LISTS, MCUBES_W


def test_values_follow_the_official_loader(mcubes_root):
    """jamycheung/DELIVER semseg/datasets/mcubes.py:88-105: RGB / NIR 8-bit (divided by 255
    later), AoLP the raw float sin/cos as [sin, cos, sin], DoLP raw float repeated, then
    columns from `_left_offset` = 192 on. Nothing quantised (frame=None: no FixScaleCrop)."""
    root, written = mcubes_root
    ds = datasets.load("mcubes", root, "train", frame=None)
    assert ds.ids == [f"train/{n}" for n in MCUBES_LISTS["train"]]
    sample = ds[0]
    src = written[MCUBES_LISTS["train"][0]]
    width = MCUBES_W - 192
    for m in ("rgb", "aolp", "dolp", "nir"):
        assert sample.modalities[m].shape == (MCUBES_H, width, 3)
    assert sample.modalities["rgb"].dtype == sample.modalities["nir"].dtype == np.uint8
    assert sample.modalities["aolp"].dtype == sample.modalities["dolp"].dtype == np.float32
    np.testing.assert_array_equal(sample.modalities["rgb"], src["rgb"][:, 192:])
    sin, cos = src["sin"][:, 192:], src["cos"][:, 192:]
    np.testing.assert_array_equal(sample.modalities["aolp"], np.stack([sin, cos, sin], 2))
    assert sample.modalities["aolp"].min() < -0.5  # raw [-1, 1], not rescaled
    np.testing.assert_array_equal(sample.modalities["dolp"],
                                  np.stack([src["dolp"][:, 192:]] * 3, 2))
    np.testing.assert_array_equal(sample.modalities["nir"],
                                  np.stack([src["nir"][:, 192:]] * 3, 2))
    np.testing.assert_array_equal(sample.label, src["gt"][:, 192:].astype(np.int64))
    assert sample.ranges == {"aolp": (-1.0, 1.0)}
    assert sample.condition is None and sample.case is None
    # image models see AoLP mapped from [-1, 1] to [0, 1]
    np.testing.assert_allclose(sample.unit_image("aolp")[..., 1], (cos + 1) / 2, atol=1e-6)


def test_official_evaluation_frame_is_the_centre_1024_square():
    """FixScaleCrop(1024) (mcubes.py:401-418) on the 1024 x 1032 frame left after column 192:
    no resize, x1 = round((1032 - 1024) / 2) = 4, so columns 196..1219 of the 1224."""
    oh, ow, y1, x1 = fix_scale_crop(1024, 1224 - 192, 1024)
    assert (oh, ow, y1) == (1024, 1032, 0)
    assert (192 + x1, 192 + x1 + 1024 - 1) == (196, 1219)
    assert fix_scale_crop(1024, 1022, 1024) == (1026, 1024, 1, 0)  # tall: Python round(1.0)


def test_frame_crops_the_centre_like_fix_scale_crop(mcubes_root):
    """The same arithmetic on the 16 x 20 test frame: crop 16 -> columns 192 + 2 .. 192 + 17."""
    root, written = mcubes_root
    sample = datasets.load("mcubes", root, "train", frame=16)[1]
    src = written[MCUBES_LISTS["train"][1]]
    cols = slice(194, 210)
    np.testing.assert_array_equal(sample.label, src["gt"][:, cols].astype(np.int64))
    np.testing.assert_array_equal(sample.modalities["rgb"], src["rgb"][:, cols])
    np.testing.assert_array_equal(sample.modalities["aolp"][..., 0], src["sin"][:, cols])


def test_frame_smaller_than_the_image_resizes_like_cv2_linear(mcubes_root):
    """frame=8 on 16 x 20: FixScaleCrop resizes to 8 x 10 (cv2 INTER_LINEAR on the float
    images, INTER_NEAREST on the label; mcubes.py:425-433) and crops x1 = 1. At exactly half
    size, linear interpolation with half-pixel centres is the mean of each 2 x 2 block."""
    root, written = mcubes_root
    sample = datasets.load("mcubes", root, "train", frame=8)[0]
    src = written[MCUBES_LISTS["train"][0]]

    def blocks(x):
        x = x[:, 192:].astype(np.float64)
        return (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]) / 4

    np.testing.assert_allclose(sample.modalities["dolp"][..., 0], blocks(src["dolp"])[:, 1:9],
                               atol=1e-6)
    rgb = np.stack([blocks(src["rgb"][..., c]) for c in range(3)], 2) / 255
    assert sample.modalities["rgb"].dtype == np.float32  # the official img is float already
    np.testing.assert_allclose(sample.modalities["rgb"], rgb[:, 1:9], atol=1e-6)
    np.testing.assert_array_equal(sample.label, src["gt"][:, 192:][0::2, 0::2][:, 1:9])


def test_sixteen_bit_nir_and_float64_maps_keep_full_precision(mcubes_root):
    """16-bit NIR is float32 / 65535 (mcubes.py:97-98), float64 .npy maps stay float64."""
    root, _ = mcubes_root
    name = MCUBES_LISTS["test"][0]
    nir = (np.arange(MCUBES_H * MCUBES_W, dtype=np.uint32).reshape(MCUBES_H, MCUBES_W)
           * 257 % 65536).astype(np.uint16)
    Image.fromarray(nir).save(root / "NIR_warped" / f"{name}.png")
    dolp = np.linspace(0, 1, MCUBES_H * MCUBES_W).reshape(MCUBES_H, MCUBES_W)
    np.save(root / "polL_dolp" / f"{name}.npy", dolp)
    sample = datasets.load("mcubes", root, "test", frame=None)[0]
    assert sample.modalities["nir"].dtype == np.float32
    np.testing.assert_array_equal(sample.modalities["nir"][..., 2],
                                  nir[:, 192:].astype(np.float32) / np.float32(65535))
    assert sample.modalities["dolp"].dtype == np.float64
    np.testing.assert_array_equal(sample.modalities["dolp"][..., 0], dolp[:, 192:])


def test_val_reads_test_list_like_cmnext_unless_told(mcubes_root):
    root, _ = mcubes_root
    assert datasets.load("mcubes", root, "val").ids == [f"val/{n}" for n in MCUBES_LISTS["test"]]
    own = datasets.load("mcubes", root, "val", cmnext_val=False)
    assert own.ids == [f"val/{n}" for n in MCUBES_LISTS["val"]]


def test_info_counts_and_classes(mcubes_root):
    root, _ = mcubes_root
    info = datasets.info("mcubes", root)
    assert info["num_classes"] == 20 and info["classes"][0] == "asphalt"
    assert info["classes"][-1] == "sky"
    assert {k: v["samples"] for k, v in info["splits"].items()} == {"train": 2, "val": 1,
                                                                    "test": 2}


def test_modality_subset_in_requested_order(mcubes_root):
    root, _ = mcubes_root
    sample = datasets.load("mcubes", root, "test", modalities=["nir", "rgb"], frame=None)[0]
    assert list(sample.modalities) == ["nir", "rgb"]


def test_student_inputs_equal_the_official_tensors(mcubes_root):
    """What the official val pipeline hands the model (mcubes.py:88-99, Normalize 162-182,
    ToTensor 200-213): RGB (x / 255 - mean) / std, AoLP and DoLP raw, NIR x / 255."""
    from stages.student.data import AugmentConfig, StudentData

    root, written = mcubes_root
    ds = datasets.load("mcubes", root, "train", frame=None)
    item = StudentData(ds, ["rgb", "aolp", "dolp", "nir"], None, None, AugmentConfig(), 0)[
        (-1, 0)]
    src = written[MCUBES_LISTS["train"][0]]
    x = item["images"].numpy()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    rgb = src["rgb"][:, 192:].astype(np.float32) / 255
    for c in range(3):
        np.testing.assert_allclose(x[0, c], (rgb[..., c] - mean[c]) / std[c], atol=1e-6)
    np.testing.assert_array_equal(x[1], np.stack([src["sin"], src["cos"], src["sin"]])[:, :, 192:])
    np.testing.assert_array_equal(x[2, 0], src["dolp"][:, 192:])
    np.testing.assert_array_equal(x[3, 1], src["nir"][:, 192:].astype(np.float32) / 255)
