"""One writer per folder: an advisory `flock` on `<folder>/.lock`, shared by the teacher
store and the training run folder, so two runs never interleave their writes."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from any2seg.errors import PipelineError

LOCK_NAME = ".lock"


@contextmanager
def folder_lock(path: Path, refusal: str, option: str = "--out") -> Iterator[None]:
    """Exclusive lock on `path` for one run, released by the kernel even on SIGKILL.
    A second holder is refused in one line: `{path} is being written by {holder}; {refusal}`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise PipelineError(f"{option} {path} is not writable ({exc.strerror}); make it "
                            f"writable or choose another {option}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PipelineError(f"{path} is being written by {holder}; {refusal}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)


def check_run_folder(path: Path, option: str = "--out") -> None:
    """Refuse an output folder that cannot be created, before anything is written: a file
    in its place or above it, a name longer than the filesystem allows, an empty value."""
    if str(path) == "":
        raise PipelineError(f"{option} is empty; give a folder")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" ({p} above it)"
                raise PipelineError(f"{option} {path} is a file, not a folder{where}; choose "
                                    f"another {option}")
            break
    try:
        limit = os.pathconf(p if p.exists() else ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [part for part in path.parts if len(part.encode()) > limit]
    if long:
        raise PipelineError(f"{option} {path}: the name {long[0][:40]}... is longer than the "
                            f"{limit} bytes the filesystem allows; choose a shorter {option}")


def check_outside(path: Path, forbidden: Path, option: str, what: str) -> None:
    """Refuse an output folder inside (or equal to) an input folder: writing there would
    mix results into the data."""
    out, inner = path.resolve(), forbidden.resolve()
    if out == inner or inner in out.parents:
        raise PipelineError(f"{option} {path} is inside {what} {forbidden}; write the results "
                            f"elsewhere (choose another {option})")
