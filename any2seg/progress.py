"""Progress bars that read well in a terminal and in a log.

On a terminal: tqdm, redrawn in place. Anywhere else (DVC, CI, `> log 2>&1`) tqdm would
write hundreds of carriage-return updates into the file, so a plain line is printed
instead at each further 10 % of the work (but not within 1 s of the previous line, so work
that takes a second prints only its final line), or after 10 s without one, and once at
the end. With `heartbeat` a thread prints the 10 s line even while one item takes
minutes (a validation frame at 1024 px), so a log never goes silent; lines carry an ETA.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

LINE_EVERY_S = 10.0
LINE_EVERY_FRACTION = 0.1
LINE_GAP_S = 1.0  # a 10 % line needs this long since the previous line


def interactive(stream: IO[str] | None = None) -> bool:
    """Whether progress goes to a terminal (bars redrawn in place)."""
    stream = stream or sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def quiet_library_bars(stream: IO[str] | None = None) -> None:
    """Silence the weight-loading bars of transformers / huggingface_hub off a terminal."""
    if interactive(stream):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


class LineProgress:
    """The part of tqdm's interface the pipeline uses, printing whole lines."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int | None = None,
                 desc: str = "", unit: str = "it", initial: int = 0,
                 stream: IO[str] | None = None, clock: Any = time.monotonic,
                 heartbeat: bool = False, start: float | None = None) -> None:
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.stream = stream or sys.stderr
        self.clock = clock
        self.t0 = clock() if start is None else start  # `start`: when the work began
        self.last_t = clock()
        self.last_step = self._step(initial)
        self.postfix = ""
        self.closed = False
        self.lines = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if heartbeat:
            threading.Thread(target=self._beat, daemon=True, name=f"progress {desc}").start()

    def _beat(self) -> None:
        while not self._stop.wait(LINE_EVERY_S / 4):
            with self._lock:
                finished = bool(self.total) and self.n >= self.total  # close() says it
                if not self.closed and not finished and \
                        self.clock() - self.last_t >= LINE_EVERY_S:
                    self._emit()

    def _step(self, n: int) -> int:
        if not self.total:
            return 0
        return int(n / self.total / LINE_EVERY_FRACTION + 1e-9)

    def _line(self) -> str:
        elapsed = self.clock() - self.t0
        done = self.n - self.start_n
        rate = f", {done / elapsed:.2f} {self.unit}/s" if elapsed >= 1 and done else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        post = f" {self.postfix}" if self.postfix else ""
        eta = ""
        if self.total and done and self.n < self.total and elapsed >= 1:
            eta = f", ETA {(self.total - self.n) * elapsed / done:.0f} s"
        return f"{self.desc}: {count} {self.unit}{pct} in {elapsed:.0f} s{rate}{eta}{post}"

    def _emit(self) -> None:
        print(self._line(), file=self.stream, flush=True)
        self.lines += 1
        self.last_t = self.clock()
        self.last_step = self._step(self.n)

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.n += n
            if self.total and self.n >= self.total:
                return  # the final line comes from close()
            since = self.clock() - self.last_t
            if (self._step(self.n) > self.last_step and since >= LINE_GAP_S) \
                    or since >= LINE_EVERY_S:
                self._emit()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if not self.closed:
                self.closed = True
                if self.n > self.start_n or not self.total:
                    self._emit()

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None,
             desc: str = "", unit: str = "it", initial: int = 0, leave: bool = True,
             enabled: bool = True, stream: IO[str] | None = None,
             start: float | None = None) -> Any:
    """A tqdm bar on a terminal, a `LineProgress` with a heartbeat elsewhere, a silent
    pass-through when not `enabled`. `start` (time.monotonic) is when the work began, for a
    bar made when the first progress report arrives."""
    if not enabled:
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, initial=initial, disable=True)
    if interactive(stream):
        from tqdm.auto import tqdm

        bar = tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                   file=stream)
        if start is not None:
            bar.start_t = start - time.monotonic() + bar._time()
        return bar
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial,
                        stream=stream, heartbeat=True, start=start)


@contextmanager
def reporting(desc: str, unit: str, leave: bool = True,
              start: float | None = None) -> Iterator[Callable[[int, int], None]]:
    """A `progress(done, total)` callback for work that reports its own counts: the bar
    appears at the first report (when the total is known) and is closed on exit."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total=total, desc=desc, unit=unit, leave=leave, start=start)
        bar.update(done - bar.n)

    try:
        yield report
    finally:
        if bar is not None:
            bar.close()
