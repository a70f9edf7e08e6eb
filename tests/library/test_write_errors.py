"""Where writing an output fails (any2seg.runlock, any2seg.pack, any2seg.diskspace): an --out
that is or lies under a file, a read-only store lock, a disk that fills or a write refused
during a pack. One line naming the path and what to change; nothing half-written is left."""

import pytest

from any2seg.errors import PipelineError
from tests.cli_errors import (
    assert_one_line_error,
    assert_work_fails_in_one_line,
    params_with,
    run_cli,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_out_that_is_or_lies_under_a_file_is_named(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, {})
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    extra = ["--checkpoint", tmp_path / "best.pt"] if command == "evaluate" else []
    for out, named in ((afile, "is a file, not a folder"),
                       (afile / "sub", f"({afile} above it)")):
        code, _, err = run_cli(capsys, [command, "--params", params, *extra, "--out", out])
        assert_one_line_error(code, err, f"--out {out}", named)
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "params.yaml"]


def test_read_only_store_lock_names_the_store(tmp_path, monkeypatch):
    from any2seg import runlock
    from any2seg.store import writer_lock

    def read_only(*args, **kw):
        raise OSError(30, "Read-only file system", str(tmp_path / "s.zarr" / ".lock"))
    monkeypatch.setattr(runlock.os, "open", read_only)
    with pytest.raises(PipelineError) as err:
        with writer_lock(tmp_path / "s.zarr"):
            pass
    assert f"--out {tmp_path / 's.zarr'} is not writable (Read-only file system)" in \
        str(err.value) and "make it writable" in str(err.value)


# ---------------------------------------------------------------------------------------
# Inputs that pass every check of the settings and go wrong while pack writes (rows of the
# table whose evaluate row is in tests/student/test_student_errors.py; the runner is
# tests/cli_errors.py): (id, builder(tmp_path, deliver root) -> (arguments, Python run before
# the command), texts the one-line error must contain)

# the disk fills (another process) after pack checked the free space: writes fail ENOSPC
DISK_FILLS = """
import errno, os
left, real = [20000], os.pwrite
def pwrite(fd, data, offset):
    if left[0] <= 0:
        raise OSError(errno.ENOSPC, "No space left on device")
    done = real(fd, data[:left[0]], offset)
    left[0] -= done
    return done
os.pwrite = pwrite
"""


# the kernel refuses a write inside HDF5 (RLIMIT_FSIZE: EFBIG instead of SIGXFSZ); closing
# the file crashed HDF5's C layer after that (SIGSEGV) before pack wrote through GuardedFile
WRITE_REFUSED = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
"""


def _pack_with(prelude):
    def build(tmp_path, root):
        return ["pack", "--dataset", "deliver", "--root", root, "--out",
                tmp_path / "packs" / "deliver.h5"], prelude
    return build


WORK_CASES = [
    ("pack: the disk fills during the HDF5 write", _pack_with(DISK_FILLS),
     ["no space left on the disk of", "packs", "needs about"]),
    ("pack: write(2) fails inside HDF5", _pack_with(WRITE_REFUSED),
     ["could not write --out", "deliver.h5", "File too large", "nothing was left there"]),
]


@pytest.mark.parametrize("case", WORK_CASES, ids=[c[0] for c in WORK_CASES])
def test_failure_during_the_work_is_one_line(case, deliver_root, tmp_path):
    assert_work_fails_in_one_line(case, deliver_root, tmp_path)
