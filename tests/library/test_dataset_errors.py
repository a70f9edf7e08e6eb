"""The data-set readers' errors (any2seg.datasets): a missing, truncated or garbage file, a
label out of range or of the wrong size, a root that is missing, empty or one level too high,
MCubeS' npy files, and `datasets check` on a root without samples; each names the file."""

import logging
import shutil

import numpy as np
import pytest

from any2seg import datasets
from any2seg.errors import DatasetError
from tests.cli_errors import assert_one_line_error, run_cli
from tests.layouts import FRAMES, save

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


SCENE = "cloud/train/MAP_1_point1"


def path(root, top, kind, frame=FRAMES[0], scene=SCENE):
    return root / top / scene / f"{frame}_{kind}_front.png"


def test_missing_modality_file_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "lidar", "lidar")
    victim.unlink()
    with pytest.raises(DatasetError) as err:
        datasets.load("deliver", root, "train")
    msg = str(err.value)
    assert str(victim) in msg and "--skip-bad" in msg and "\n" not in msg
    # a modality that is not requested does not matter
    assert len(datasets.load("deliver", root, "train", modalities=["rgb", "depth"])) == 6


def test_skip_bad_logs_and_skips_missing(deliver_root, caplog):
    root, _ = deliver_root
    path(root, "event", "event").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        ds = datasets.load("deliver", root, "train", skip_bad=True)
    assert len(ds) == 5
    assert f"{SCENE}/{FRAMES[0]}" not in ds.ids
    assert any("event" in r.getMessage() for r in caplog.records)


def test_truncated_png_is_named_on_access(deliver_root):
    root, _ = deliver_root
    victim = path(root, "img", "rgb")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    ds = datasets.load("deliver", root, "train")
    index = ds.ids.index(f"{SCENE}/{FRAMES[0]}")
    with pytest.raises(DatasetError) as err:
        ds[index]
    assert str(victim) in str(err.value) and "corrupt or truncated" in str(err.value)
    assert victim.read_bytes() == data[: len(data) // 2]  # nothing rewritten


def test_garbage_file_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "hha", "depth", frame=FRAMES[1])
    victim.write_bytes(b"this is not a png")
    ds = datasets.load("deliver", root, "train", skip_bad=True)
    assert f"{SCENE}/{FRAMES[1]}" not in ds.ids and len(ds) == 5
    with pytest.raises(DatasetError, match="cannot decode"):
        datasets.load("deliver", root, "train")[1]


def test_label_out_of_range_is_refused(deliver_root):
    root, _ = deliver_root
    victim = path(root, "semantic", "semantic")
    red = np.full((24, 32), 7, np.uint8)
    red[3, 3] = 40
    save(victim, np.stack([red, red, red], axis=2))
    ds = datasets.load("deliver", root, "train")
    with pytest.raises(DatasetError) as err:
        ds[0]
    assert str(victim) in str(err.value) and "40" in str(err.value)
    assert len(datasets.load("deliver", root, "train", skip_bad=True)) == 5


def test_size_mismatch_of_non_event_modality_is_refused(deliver_root):
    root, _ = deliver_root
    victim = path(root, "lidar", "lidar")
    save(victim, np.zeros((12, 16), np.uint8))
    with pytest.raises(DatasetError, match="16x12"):
        datasets.load("deliver", root, "train")[0]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load("deliver", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="make-sample"):
        datasets.info("sample", tmp_path / "nope")


def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a DELIVER root"):
        datasets.load("deliver", tmp_path / "empty", "train")


def test_parent_of_root_gets_a_hint(deliver_root):
    root, _ = deliver_root
    with pytest.raises(DatasetError, match=f"did you mean --root {root}"):
        datasets.info("deliver", root.parent)


def test_root_with_no_samples_for_split(deliver_root):
    root, _ = deliver_root
    with pytest.raises(DatasetError, match="no samples"):
        datasets.load("deliver", root, "test", condition="cloud")


def test_mcubes_missing_npy_and_bad_root(mcubes_root, tmp_path):
    root, _ = mcubes_root
    victim = next((root / "polL_aolp_cos").iterdir())
    victim.unlink()
    with pytest.raises(DatasetError, match="polL_aolp_cos"):
        datasets.load("mcubes", root, ["train", "val", "test"], cmnext_val=False)
    with pytest.raises(DatasetError, match="not an MCubeS root"):
        datasets.load("mcubes", tmp_path, "train")


def test_mcubes_corrupt_npy(mcubes_root):
    root, _ = mcubes_root
    victim = next((root / "polL_dolp").iterdir())
    victim.write_bytes(b"\x93NUMPY garbage")
    ds = datasets.load("mcubes", root, ["train", "test"])
    with pytest.raises(DatasetError, match="corrupt"):
        [s for s in ds]


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="known datasets: deliver, mcubes, sample"):
        datasets.load("cityscapes", ".", "train")


def test_label_of_the_wrong_size_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "semantic", "semantic")
    save(victim, np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        datasets.load("deliver", root, "train")[0]
    assert f"label {victim} is 16x12" in str(err.value) and "32x24" in str(err.value)


def test_datasets_check_fails_on_a_root_without_samples(tmp_path, capsys):
    for folder in ("img", "hha", "event", "lidar", "semantic"):
        (tmp_path / "empty" / folder).mkdir(parents=True)
    code, out, err = run_cli(capsys, ["datasets", "check", "--dataset", "deliver", "--root",
                                      tmp_path / "empty"])
    assert_one_line_error(code, err, "no deliver samples", str(tmp_path / "empty"),
                          "img/<condition>/<split>/<scene>/<frame>_rgb_front.png")
    mcubes = tmp_path / "mcubes"
    (mcubes / "list_folder").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (mcubes / "list_folder" / f"{split}.txt").write_text("")
    code, out, err = run_cli(capsys, ["datasets", "check", "--dataset", "mcubes", "--root",
                                      mcubes])
    assert_one_line_error(code, err, "no mcubes samples", "list_folder/<split>.txt")


def test_datasets_check_names_an_empty_split(deliver_root, capsys):
    root, _ = deliver_root
    shutil.rmtree(root / "img" / "sun")  # the only test scene
    code, out, _ = run_cli(capsys, ["datasets", "check", "--dataset", "deliver", "--root",
                                    root])
    assert code == 1 and "split test: no samples; expected" in out
