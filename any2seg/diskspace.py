"""Full disks: check the free space before a large write and turn a write that ran out of
room into one line naming the folder and the space needed, with nothing half-written left."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from any2seg.errors import PipelineError

# below this much headroom over the estimate a write is refused before it starts
MARGIN_BYTES = 1 << 20


def human(n: float) -> str:
    """Bytes in the unit a person reads (1.5 GiB, 312 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer on the filesystem holding `folder` (or the
    nearest existing parent)."""
    for p in (folder, *folder.parents):
        if p.exists():
            return shutil.disk_usage(p).free
    return shutil.disk_usage(".").free


def full_disk_error(folder: Path, needed: int, what: str) -> PipelineError:
    return PipelineError(f"no space left on the disk of {folder} for {what} (needs about "
                         f"{human(needed)}, {human(free_bytes(folder))} free); free space "
                         "there or choose another folder, then rerun")


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before writing `needed` bytes into `folder` when they cannot fit."""
    if free_bytes(folder) < needed + MARGIN_BYTES:
        raise full_disk_error(folder, needed, what)


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library wrapped it in a RuntimeError (torch.save's
    "unexpected pos" from its zip writer) or chained it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left" in text or "unexpected pos" in text or "Disk quota" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def temp_path(path: Path) -> Path:
    """The temporary sibling this process writes `path` through: `.<name>.tmp-<pid>`."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_temps(path: Path) -> None:
    """Drop the temporary siblings of `path` (files or folders) left by killed writers,
    whose process no longer exists; a live writer's (this user's or another's) stays."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (ValueError, ProcessLookupError):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def write_atomic(path: Path, write: Callable[[Path], None], needed: int, what: str) -> None:
    """Write `path` through a temporary file unique to this writer (`temp_path`),
    flushed to disk and renamed over `path`: a reader sees the old file or the new one,
    two writers never rename each other's file, and a failure (a full disk) leaves the old
    file as it was and no temporary file behind."""
    check_free_space(path.parent, needed, what)
    tmp = temp_path(path)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise full_disk_error(path.parent, needed, what) from exc
        raise
