"""`make setup` checks the free disk space before it installs several GB, so a full disk
ends in one line naming the folder and the fix, not in pip's OSError halfway through
torch (what a CI machine with 2.9 GB free printed), and leaves no half-made environment."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup(venv: Path, need_gb: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "setup", f"VENV={venv}",
                           f"SETUP_FREE_GB={need_gb}", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_a_disk_without_room_is_refused_before_anything_is_made(tmp_path):
    venv = tmp_path / "venv"
    run = setup(venv, "1e9")
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if line.startswith("make setup:")]
    assert len(lines) == 1, run.stderr
    assert f"free under {tmp_path}" in lines[0] and "VENV=" in lines[0]
    assert "Traceback" not in run.stderr and "Installing" not in run.stdout
    assert not venv.exists()

