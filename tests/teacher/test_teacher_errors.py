"""The teacher stages' errors (stages.teacher): fit sizes past what memory holds, a dask
scheduler with no worker or out of reach, a teacher root that is a file or lacks a branch;
and a subset of modalities that the default params accept."""

import socket
import time

import pytest

from tests.cli_errors import assert_one_line_error, params_with, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("key,value", [("hidden", 10000000), ("image_size", 100000),
                                       ("batch_size", 10**9)])
def test_fit_sizes_are_bounded(key, value, capsys, tmp_path, monkeypatch):
    """teacher.fit.hidden 10000000 ended in a 41-line allocator traceback."""
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, {f"teacher.fit.{key}": value})
    code, _, err = run_cli(capsys, ["fit-teacher", "--params", params])
    assert_one_line_error(code, err, f"teacher.fit.{key} must be <=", str(value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_scheduler_local_0_fails_at_once_and_leaves_the_store_unlocked(teacher_sample,
                                                                        tmp_path, capsys):
    """It used to start a cluster with no worker and wait forever holding the lock."""
    root, _ = teacher_sample
    out = tmp_path / "cache.zarr"
    args = ["cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
            "--params", params_with(tmp_path, {})]
    start = time.perf_counter()
    code, _, err = run_cli(capsys, [*args, "--scheduler", "local:0"])
    assert time.perf_counter() - start < 10
    assert_one_line_error(code, err, "--scheduler", "local:N")
    assert not out.exists()


def test_unreachable_cluster_fails_in_its_timeout_and_releases_the_lock(teacher_sample,
                                                                        tmp_path, capsys):
    import dask

    from any2seg.store import writer_lock

    root, _ = teacher_sample
    out = tmp_path / "cache.zarr"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the fixture's teacher has image and depth towers only (no fitted event / lidar)
    image_only = {"teacher.modality_branch": {"rgb": "image", "depth": "depth",
                                              "event": "image", "lidar": "image"}}
    args = ["cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
            "--params", params_with(tmp_path, image_only),
            "--scheduler", f"tcp://127.0.0.1:{port}"]
    start = time.perf_counter()
    import distributed  # noqa: F401  (its config must outlive the block below)

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, _, err = run_cli(capsys, args)
    assert time.perf_counter() - start < 30
    assert_one_line_error(code, err, f"tcp://127.0.0.1:{port}", "within 1s",
                          "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT")
    assert not (out / "zarr.json").exists()  # nothing computed or created for nothing
    with writer_lock(out):  # released: a second lock on the same file succeeds
        pass


def test_modalities_subset_works_with_the_default_params(teacher_sample, tmp_path, capsys):
    """params.yaml maps all four modalities to branches; a run on two of them uses two."""
    from any2seg.store import open_cache

    root, _ = teacher_sample
    out = tmp_path / "rd.zarr"
    code, printed, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
        "--params", params_with(tmp_path, {}), "--modalities", "rgb,depth", "--split", "val",
        "--modality-branch", "depth=image"])
    assert code == 0, err
    assert "computed" in printed
    cache = open_cache(out)
    assert cache.modalities == ["rgb", "depth"]
    assert cache.attrs["teacher_fingerprint"]["modality_branch"] == {"depth": "image",
                                                                     "rgb": "image"}


def test_unpublished_branch_missing_from_the_teacher_folder_is_named(teacher_sample, tmp_path,
                                                                     capsys):
    """lidar maps to a branch only the fitted default teacher has; a folder of real
    LanguageBind downloads (image and depth here) lacks it: say so and how to map it."""
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    code, _, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
        "--params", params_with(tmp_path, {"teacher.modality_branch": {
            "rgb": "image", "depth": "depth", "event": "image", "lidar": "lidar"}})])
    assert_one_line_error(code, err, "LanguageBind_Lidar", "lidar=image", "fit-teacher")
    assert not (out / "zarr.json").exists()


def test_teacher_root_that_is_a_file_is_named(teacher_sample, tmp_path, capsys):
    root, _ = teacher_sample
    afile = tmp_path / "teacher.txt"
    afile.write_text("")
    code, _, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", afile, "--out", tmp_path / "c.zarr",
        "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, f"teacher root {afile}", "is a file, not a folder")
