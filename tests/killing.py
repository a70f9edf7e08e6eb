"""Kill a `pipeline cache-teacher` process once its first rows are done (SIGKILL)."""

import signal
import subprocess
import time
from pathlib import Path


def kill_after_first_rows(args: list[str], store: Path, timeout: float = 180) -> None:
    """Start `args`, SIGKILL it as soon as `store` holds a `done` chunk, and wait."""
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = store / "done" / "c"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and any(done_dir.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
