"""A file HDF5 writes through without ever seeing a failed write.

When write(2) fails under HDF5 (a disk that another process filled after the free-space
check, a quota, a file-size limit), HDF5 reports it, and closing the file then crashes
in its C layer (SIGSEGV while h5py closes the file's objects, tried with h5py 3.16): a
Python `except` never runs. `GuardedFile` is handed to h5py as a Python file object
(its `fileobj` driver): the first failed write is kept in `error`, and from then on
writes are held in memory (reads see them), so HDF5 goes on as if the disk took them
and closes normally. The writer checks `error` after each piece of work and raises it
(`check`); what was written is then deleted, as after any failed write.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any


class GuardedFile(io.RawIOBase):
    """A new file at `path` (truncated) for h5py.File(GuardedFile(path), "w")."""

    def __init__(self, path: Path | str) -> None:
        super().__init__()
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pos = 0
        self._size = 0
        self._held: list[tuple[int, bytes]] = []  # (offset, bytes) written after the failure
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        done = 0
        if self.error is None:
            try:
                while done < n:
                    done += os.pwrite(self._fd, view[done:], self._pos + done)
            except OSError as exc:
                self.error = exc
        if done < n:
            self._held.append((self._pos + done, bytes(view[done:])))
        self._pos += n
        self._size = max(self._size, self._pos)
        return n

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = len(view)
        got = os.preadv(self._fd, [view], self._pos)
        view[got:] = bytes(n - got)  # a hole (or what only the held writes cover)
        for offset, data in self._held:  # in write order: the latest wins
            lo, hi = max(offset, self._pos), min(offset + len(data), self._pos + n)
            if lo < hi:
                view[lo - self._pos:hi - self._pos] = data[lo - offset:hi - offset]
        self._pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self._fd, size)
            except OSError as exc:
                self.error = exc
        self._size = size
        return size

    def flush(self) -> None:
        """Nothing is buffered here; the writer fsyncs the finished file."""

    def check(self) -> None:
        """Raise the first write error, if any (call it outside HDF5's callbacks)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
