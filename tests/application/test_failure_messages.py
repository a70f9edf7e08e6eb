"""pipeline.failures: failures outside the input (out of memory, a full or read-only disk
under the store, a dask scheduler that went away) end in one line naming what to change."""

import os

import pytest

from tests.cli_errors import assert_one_line_error, params_with, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_names_the_setting_to_lower(error, capsys, tmp_path, monkeypatch):
    from any2seg import synth

    def exhausted(*args, **kw):
        raise error
    monkeypatch.setattr(synth, "make_sample", exhausted)
    code, _, err = run_cli(capsys, ["make-sample", "--out", tmp_path / "s"])
    assert_one_line_error(code, err, "out of memory", "lower --size or --workers")


def _cache_teacher_failing_with(monkeypatch, error):
    from stages.teacher import run

    def failing(*args, **kw):
        raise error
    monkeypatch.setattr(run, "cache_teacher", failing)


@pytest.mark.parametrize("errno_, named", [
    (28, ["no space left on the device while writing --out", "free space there",
          "keeps every finished row"]),
    (30, ["is on a read-only filesystem", "make it writable", "keeps every finished row"])])
def test_full_or_read_only_store_names_the_path_and_the_remedy(teacher_sample, tmp_path, capsys,
                                                               monkeypatch, errno_, named):
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    _cache_teacher_failing_with(monkeypatch, OSError(errno_, os.strerror(errno_),
                                                     str(out / "scene" / "c" / "0")))
    code, _, err = run_cli(capsys, ["cache-teacher", "--root", root, "--teacher-root",
                                    root / "teacher", "--out", out,
                                    "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, str(out / "scene" / "c" / "0"), *named)


def test_vanished_dask_scheduler_is_named_with_what_a_rerun_does(teacher_sample, tmp_path,
                                                                 capsys, monkeypatch):
    from distributed.comm.core import CommClosedError

    root, _ = teacher_sample
    _cache_teacher_failing_with(monkeypatch, CommClosedError(
        "in <TCP (closed) ConnectionPool.gather local=tcp://127.0.0.1:50000 "
        "remote=tcp://127.0.0.1:8786>: Stream is closed"))
    code, _, err = run_cli(capsys, ["cache-teacher", "--root", root, "--teacher-root",
                                    root / "teacher", "--out", tmp_path / "c.zarr",
                                    "--scheduler", "tcp://127.0.0.1:8786",
                                    "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, "dask scheduler at tcp://127.0.0.1:8786 went away",
                          "keeps every finished row", "rerun continues")
