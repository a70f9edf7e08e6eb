import numpy as np
import pytest

from any2seg import datasets
from any2seg.datasets.deliver import CLASSES, decode_label
from tests.layouts import FRAMES, H, W


def expected_label(red: np.ndarray) -> np.ndarray:
    out = np.full(red.shape, 255, dtype=np.int64)
    valid = (red >= 1) & (red <= 25)
    out[valid] = red[valid].astype(np.int64) - 1
    return out


def test_counts_per_split_condition_and_case(deliver_root):
    root, _ = deliver_root
    info = datasets.info("deliver", root)
    assert info["num_classes"] == 25 and info["classes"] == list(CLASSES)
    assert info["total"] == 12
    train = info["splits"]["train"]
    assert train["samples"] == 6
    assert train["conditions"] == {"cloud": 4, "fog": 0, "night": 2, "rain": 0, "sun": 0}
    assert train["cases"]["none"] == 2
    assert train["cases"]["eventlowres"] == 2
    assert train["cases"]["motionblur"] == 2
    assert train["scenes"] == 3
    val = info["splits"]["val"]
    assert val["samples"] == 4 and val["cases"]["lidarjitter"] == 2 and val["cases"]["none"] == 2
    assert info["splits"]["test"]["cases"]["overexposure"] == 2
    assert info["depth_sources"] == ["hha", "raw"]
    assert all(not s["missing_files"] for s in info["splits"].values())


def test_samples_decode_like_the_official_loader(deliver_root):
    root, written = deliver_root
    ds = datasets.load("deliver", root, "train")
    assert len(ds) == 6
    assert ds.ids[0] == f"cloud/train/MAP_1_point1/{FRAMES[0]}"
    for sample in ds:
        src = written[sample.id]
        assert list(sample.modalities) == ["rgb", "depth", "event", "lidar"]
        for m in ("rgb", "depth", "event", "lidar"):
            arr = sample.modalities[m]
            assert arr.shape == (H, W, 3) and arr.dtype == np.uint8, m
            np.testing.assert_array_equal(arr, src[m], err_msg=f"{sample.id} {m}")
        assert sample.label.dtype == np.int64 and sample.label.shape == (H, W)
        np.testing.assert_array_equal(sample.label, expected_label(src["label_red"]))
        assert sample.condition == sample.id.split("/")[0]


def test_label_decoding_ignores_0_and_255_and_shifts_classes():
    red = np.array([[0, 1, 2, 25, 255]], dtype=np.uint8)
    noisy = np.stack([red, np.full_like(red, 77), np.full_like(red, 200)], axis=2)
    label = decode_label(noisy, "x.png")
    assert label.tolist() == [[255, 0, 1, 24, 255]]


def test_event_of_lowres_scene_is_resized_with_nearest(deliver_root):
    root, written = deliver_root
    ds = datasets.load("deliver", root, "train", case="eventlowres", modalities=["event"])
    assert len(ds) == 2
    for sample in ds:
        assert sample.case == "eventlowres"
        assert written[sample.id]["event_file"].shape[:2] == (H // 2, W // 2)
        np.testing.assert_array_equal(sample.modalities["event"], written[sample.id]["event"])


def test_filters_and_modality_order(deliver_root):
    root, _ = deliver_root
    ds = datasets.load("deliver", root, "train,val", condition="cloud",
                       modalities=["lidar", "rgb"])
    assert len(ds) == 4
    assert all(s.startswith("cloud/train/") for s in ds.ids)
    assert list(ds[0].modalities) == ["lidar", "rgb"]
    clean = datasets.load("deliver", root, ["train", "val", "test"], case="none")
    assert [s.split("/")[2] for s in clean.ids] == ["MAP_1_point1"] * 2 + ["MAP_4_point7"] * 2
    assert all(datasets.load("deliver", root, "val", case="lidarjitter")[i].case == "lidarjitter"
               for i in range(2))


def test_ids_are_unique_and_ordered_by_path(deliver_root):
    root, _ = deliver_root
    ds = datasets.load("deliver", root, "train")
    ids = ds.ids
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)


def test_depth_source_raw_reads_16_bit_depth_as_miss(deliver_root):
    """RuipingL/MISS semseg/datasets/deliver.py:78 (`/img` -> `/depth`), 105 and 126-133
    (`io.read_image` keeps the uint16 values, 1 channel repeated to 3), then
    augmentations_mm.py:39-41 (`.float() / 255`): the student sees up to 65535 / 255 = 257."""
    from stages.student.data import AugmentConfig, StudentData

    root, written = deliver_root
    ds = datasets.load("deliver", root, "val", modalities=["depth"], depth_source="raw")
    sample = ds[0]
    mm = written[sample.id]["depth_raw_mm"]
    assert sample.files["depth"].parts[-5] == "depth"
    assert sample.modalities["depth"].dtype == np.uint16
    np.testing.assert_array_equal(sample.modalities["depth"], np.repeat(mm[:, :, None], 3, 2))
    np.testing.assert_array_equal(sample.raw["depth"], mm)  # metric values kept as stored
    item = StudentData(ds, ["depth"], None, None, AugmentConfig(), 0)[(-1, 0)]
    expected = mm.astype(np.float32) / np.float32(255)
    for c in range(3):
        np.testing.assert_array_equal(item["images"][0, c].numpy(), expected)
    assert float(item["images"].max()) == pytest.approx(mm.max() / 255) and mm.max() > 60000
    hha = datasets.load("deliver", root, "val", modalities=["depth"])[0]
    assert hha.files["depth"].parts[-5] == "hha"
    np.testing.assert_array_equal(hha.modalities["depth"], written[sample.id]["depth"])


def test_slicing_keeps_a_lazy_sequence(deliver_root):
    root, _ = deliver_root
    ds = datasets.load("deliver", root, "train")
    part = ds[1:3]
    assert len(part) == 2 and part.ids == ds.ids[1:3]
    assert part[0].id == ds[1].id


@pytest.mark.parametrize("bad", [{"split": "training"}, {"modalities": ["thermal"]},
                                 {"case": "snow"}, {"condition": "snow"},
                                 {"depth_source": "lidar"}, {"modalities": []}])
def test_invalid_options_are_refused(deliver_root, bad):
    root, _ = deliver_root
    options = {"split": "train", **bad}
    split = options.pop("split")
    with pytest.raises(datasets.registry.DatasetError):
        datasets.load("deliver", root, split, **options)


def test_sequences_pickle_for_worker_processes(deliver_root, mcubes_root):
    import pickle

    for name, (root, _) in (("deliver", deliver_root), ("mcubes", mcubes_root)):
        reversed_order = list(datasets.get(name).modalities)[::-1]
        ds = datasets.load(name, root, "train", modalities=reversed_order)
        copy = pickle.loads(pickle.dumps(ds))
        assert copy.ids == ds.ids
        a, b = ds[0], copy[0]
        assert list(a.modalities) == list(b.modalities) == list(ds.modalities)
        for m in a.modalities:
            np.testing.assert_array_equal(a.modalities[m], b.modalities[m])


def test_check_lists_missing_and_undecodable_files(deliver_root):
    """`datasets.check` (what `pipeline datasets check` prints) without the CLI runner."""
    root, _ = deliver_root
    assert datasets.check("deliver", root, "train,val") == (10, [])
    records = datasets.get("deliver").index(root, "train")
    gone, broken = records[0], records[1]
    gone.files["depth"].unlink()
    broken.files["rgb"].write_bytes(b"not a png")
    checked, problems = datasets.check("deliver", root, "train")
    assert checked == 6 and len(problems) == 2
    assert problems[0].startswith(f"{gone.id}: missing depth file ")
    assert problems[1].startswith(f"{broken.id}: ")
