import numpy as np

from pipeline import datasets
from tests.layouts import MCUBES_H, MCUBES_LISTS, MCUBES_W


def quant(x, lo, hi):
    return np.round((np.clip(x, lo, hi) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def test_modalities_follow_cmnext(mcubes_root):
    root, written = mcubes_root
    ds = datasets.load("mcubes", root, "train")
    assert ds.ids == [f"train/{n}" for n in MCUBES_LISTS["train"]]
    sample = ds[0]
    src = written[MCUBES_LISTS["train"][0]]
    width = MCUBES_W - 192
    for m in ("rgb", "aolp", "dolp", "nir"):
        assert sample.modalities[m].shape == (MCUBES_H, width, 3)
        assert sample.modalities[m].dtype == np.uint8
    np.testing.assert_array_equal(sample.modalities["rgb"], src["rgb"][:, 192:])
    sin, cos = quant(src["sin"], -1, 1)[:, 192:], quant(src["cos"], -1, 1)[:, 192:]
    np.testing.assert_array_equal(sample.modalities["aolp"], np.stack([sin, cos, sin], 2))
    dolp = quant(src["dolp"], 0, 1)[:, 192:]
    np.testing.assert_array_equal(sample.modalities["dolp"], np.stack([dolp] * 3, 2))
    np.testing.assert_array_equal(sample.modalities["nir"],
                                  np.stack([src["nir"][:, 192:]] * 3, 2))
    np.testing.assert_array_equal(sample.label, src["gt"][:, 192:].astype(np.int64))
    assert sample.condition is None and sample.case is None


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
    sample = datasets.load("mcubes", root, "test", modalities=["nir", "rgb"])[0]
    assert list(sample.modalities) == ["nir", "rgb"]
