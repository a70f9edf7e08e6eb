"""Damaged PNGs through the commands that decode them, in a subprocess, so a native crash
(the old libpng path died with SIGSEGV on a damaged IDAT) fails this test instead of the
test run. One DELIVER-layout tree carries every kind of damage, in a different sample
each, so one process running the commands in turn covers them all (`tests.damage.pipelines`:
each command's own exit status and output). `tests/e2e/test_damaged_reader_paths.py`
takes the same damage through training, evaluation and MCubeS's readers."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.damage import (
    ROOT,
    bad_crc,
    bomb,
    jpeg,
    label_16bit,
    overwrite_idat,
    pipelines,
    truncated,
)
from tests.layouts import FRAMES, write_deliver

# (scene, frame, top folder, file kind): damage; every damaged file in its own sample
TRAIN = [("cloud/train/MAP_1_point1", f) for f in FRAMES] + \
    [("cloud/train/MAP_2_point4_eventlowres", f) for f in FRAMES] + \
    [("night/train/MAP_3_point2_motionblur", f) for f in FRAMES]
DAMAGE = {
    (*TRAIN[0], "img", "rgb"): overwrite_idat,
    (*TRAIN[1], "lidar", "lidar"): overwrite_idat,  # a 1-channel file
    (*TRAIN[2], "img", "rgb"): lambda d: d[:len(d) // 2],  # truncated (an RGBA file)
    (*TRAIN[3], "event", "event"): bad_crc,
    (*TRAIN[4], "lidar", "lidar"): lambda d: b"",  # zero bytes
    (*TRAIN[5], "semantic", "semantic"): jpeg,  # another format under .png
    ("fog/val/MAP_4_point7", FRAMES[0], "img", "rgb"): bomb,
    ("fog/val/MAP_4_point7", FRAMES[1], "semantic", "semantic"): label_16bit,  # wrong depth
    # the raw metric depth/ file (stage one's depth branch reads it, training reads hha/)
    ("sun/test/MAP_6_point9_overexposure", FRAMES[0], "depth", "depth"): truncated,
}
BAD = len(DAMAGE)
GOOD = 12 - BAD  # write_deliver: 6 train, 4 val, 2 test samples


@pytest.fixture(scope="module")
def damaged_tree(tmp_path_factory):
    """(DELIVER root, teacher root, the damaged files)."""
    from stages.teacher.default.folders import write_default_teacher

    base = tmp_path_factory.mktemp("damaged")
    root = base / "DELIVER"
    write_deliver(root)
    files = []
    for (scene, frame, top, kind), damage in DAMAGE.items():
        path = root / top / scene / f"{frame}_{kind}_front.png"
        path.write_bytes(damage(path.read_bytes()))
        files.append(path)
    write_default_teacher(base / "teacher")
    return root, base / "teacher", files


def test_damaged_pngs_are_named_never_a_crash(damaged_tree, tmp_path):
    root, teacher, files = damaged_tree
    snapshot = {p: p.read_bytes() for p in files}

    common = ["cache-teacher", "--dataset", "deliver", "--root", root, "--teacher-root",
              teacher, "--params", ROOT / "params.yaml", "--device", "cpu"]
    check, stop, skip, info = pipelines(
        ["datasets", "check", "--dataset", "deliver", "--root", root],
        [*common, "--out", tmp_path / "stop.zarr"],
        [*common, "--skip-bad", "--out", tmp_path / "skip.zarr"],
        ["cache-info", tmp_path / "skip.zarr"], cwd=tmp_path)
    assert check.returncode == 1, (check.returncode, check.stdout, check.stderr)  # no signal
    assert "Traceback" not in check.stderr, check.stderr
    lines = check.stdout.splitlines()
    assert lines[-1].endswith(f"{BAD} bad"), lines
    for path in files:  # one line per damaged file, naming it
        assert sum(str(path) in line for line in lines) == 1, (path, lines)
    assert "libpng" in next(line for line in lines if str(files[0]) in line)
    assert "CRC error" in next(line for line in lines if str(files[3]) in line)
    assert "not a PNG: its first bytes are those of a JPEG" in \
        next(line for line in lines if str(files[5]) in line)
    assert "declares 100000 x 100000 pixels" in \
        next(line for line in lines if str(files[6]) in line)

    assert stop.returncode == 1, (stop.returncode, stop.stdout, stop.stderr)
    assert "Traceback" not in stop.stderr, stop.stderr
    err = [line for line in stop.stderr.splitlines() if not line.startswith("info: ")]
    assert len(err) == 1 and err[0].startswith("error: "), stop.stderr
    assert any(str(p) in err[0] for p in files), err
    assert "--skip-bad" in err[0]

    assert skip.returncode == 0, (skip.returncode, skip.stdout, skip.stderr)
    out = skip.stdout + skip.stderr
    assert "Traceback" not in out
    assert f"computed {GOOD} of {GOOD} rows" in out, out
    for path in files:  # each skipped sample is logged with its file
        assert str(path) in out, (path, out)
    assert f"{BAD} samples skipped as bad" in info.stdout, (info.stdout, info.stderr)
    assert {p: p.read_bytes() for p in files} == snapshot  # nothing rewritten


def test_files_pil_decodes_get_their_crcs_checked(tmp_path):
    """Palette files go to PIL, which does not check IDAT's CRC: the reader does."""
    from any2seg.datasets.decode import read_png
    from any2seg.errors import DatasetError

    rgb = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    path = tmp_path / "palette.png"
    Image.fromarray(rgb).convert("P").save(path)
    good = read_png(path)
    path.write_bytes(bad_crc(path.read_bytes()))
    with Image.open(path) as img:  # what PIL alone does with it
        assert np.array_equal(np.asarray(img.convert("RGB")), good)
    with pytest.raises(DatasetError, match=r"palette\.png \(CRC error in its b'IDAT' chunk"):
        read_png(path)
