"""The writer lock of a store: one stage-one run at a time, and a --out that can be a folder.

Writers hold an exclusive `flock` on `<store>/.lock` for the whole run (released by the
kernel even on SIGKILL); readers never lock, and a complete store is never locked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from any2seg.errors import PipelineError
from any2seg.runlock import folder_lock


def check_out_path(path: Path) -> None:
    """Refuse a --out that cannot be a store folder before anything is created."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "--out" if p == path else f"--out's parent {p}"
                raise PipelineError(f"{what} is a file, not a folder: the teacher cache is a "
                                    f"store folder; choose another --out (e.g. "
                                    f"cache/<dataset>.zarr)")
            return


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the store for one run; released by the kernel even on SIGKILL."""
    check_out_path(path)
    with folder_lock(path, "wait for it to finish (two writers on one store are refused)"):
        yield
