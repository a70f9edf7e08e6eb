"""Kill a `pipeline cache-teacher` process once its first rows are done (SIGKILL)."""

import signal
import subprocess
import time
from pathlib import Path

import zarr


def first_rows_done(store: Path) -> bool:
    """Whether the store's `done` array marks a row. Read, not inferred from a chunk file
    appearing: the writer creates the file before it fills it, and a kill in between
    leaves no row done (under load the first check often fell there)."""
    if not (store / "done" / "c").is_dir():
        return False
    try:
        return bool(zarr.open_array(store / "done", mode="r")[:].any())
    except Exception:  # noqa: BLE001 - a chunk mid-write reads as not yet done
        return False


def kill_after_first_rows(args: list[str], store: Path, timeout: float = 180) -> None:
    """Start `args`, SIGKILL it as soon as `store` marks a row done, and wait."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if first_rows_done(store):
            break
        time.sleep(0.01)
    if proc.poll() is not None:  # ended on its own: the kill cannot land, say why
        raise AssertionError(f"{' '.join(map(str, args[:4]))} ended before the kill with "
                             f"exit {proc.returncode}:\n{proc.stderr.read().decode()[-2000:]}")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
