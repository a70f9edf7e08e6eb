"""What a SIGKILLed `pipeline ablate` run leaves under .dvc/tmp/exps, and its removal.

`dvc exp run --temp` works in .dvc/tmp/exps/standalone/tmp<random> and removes it when it
ends; a SIGKILL leaves it (a full checkout, the data and the teacher cache included) and
its `.run` info files, which `dvc exp show` then lists as running. While a run is under
way ablate keeps `<log_dir>/<run name>.pid` naming its `dvc` process; the next ablate
removes what a run left whose process is gone, and nothing of anyone else's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from any2seg.errors import PipelineError

MARKER = ".pid"  # <log_dir>/<run name>.pid: {"pid": its dvc process, "baseline", "started"}
FINISHED = 6  # dvc's TaskStatus.FINISHED: the executor collected and cleaned up


def _alive(pid: int, name: str) -> bool:
    """Whether process `pid` is still the `dvc exp run` of `name` (a reused pid is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    proc = Path(f"/proc/{pid}")
    if not proc.is_dir():  # no procfs: a live pid counts as the run
        return True
    try:
        if proc.joinpath("stat").read_text().rpartition(")")[2].split()[0] in "ZX":
            return False  # exited, not yet reaped
        argv = proc.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
    except (OSError, IndexError):  # gone meanwhile
        return False
    return argv == [""] or name in argv  # empty: still starting (exec), count it as alive


def _dvc_infos(exps: Path) -> list[tuple[Path, dict[str, Any]]]:
    """dvc's executor info files (run/<rev>/<rev>.run, standalone/run/<rev>/<rev>.run)."""
    out = []
    for path in [*exps.glob("run/*/*.run"), *exps.glob("*/run/*/*.run")]:
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def _bare(folder: Path) -> bool:
    """A temp folder dvc was killed in while creating it: an empty git repository only."""
    git = folder / ".git"
    return [p.name for p in folder.iterdir()] == [".git"] and git.is_dir() and \
        not (git / "packed-refs").exists() and \
        not any(p.is_file() for p in (git / "refs").rglob("*"))


BARE_AGE_S = 60  # a bare temp folder this old is no live run's (dvc fills it in seconds)


def clean_killed_runs(root: Path, log_dir: Path, echo: Any = print) -> list[str]:
    """Remove what the runs of a killed ablate left under .dvc/tmp/exps; returns their names.

    Only runs this plan started are touched (a `.pid` marker in its log folder), only when
    that process is gone (a run still alive stops ablate with a message instead), and only
    folders an info file of that run names, or, for a run killed in its first second before
    dvc wrote one, bare folders (an empty git repository) created after it started and over
    a minute old."""
    exps = (root / ".dvc" / "tmp" / "exps").resolve()
    cleaned = []
    for marker in sorted(log_dir.glob(f"*{MARKER}")) if log_dir.is_dir() else []:
        name = marker.name[:-len(MARKER)]
        try:
            info = json.loads(marker.read_text())
            pid, baseline, started = int(info["pid"]), str(info["baseline"]), \
                float(info["started"])
        except (OSError, ValueError, KeyError, TypeError):
            marker.unlink(missing_ok=True)  # half-written: its run never started
            continue
        if _alive(pid, name):
            raise PipelineError(f"run {name} is still running (pid {pid}, started by an "
                                f"earlier ablate); wait for it to end or stop it (kill {pid}), "
                                "then rerun")
        infos = _dvc_infos(exps) if exps.is_dir() else []
        removed, found = [], False
        for infofile, run in infos:
            if run.get("name") != name or run.get("baseline_rev") != baseline or \
                    run.get("status", 0) >= FINISHED:
                continue
            workdir = Path(run.get("root_dir") or "").resolve()
            if workdir != exps and workdir.is_relative_to(exps) and workdir.is_dir():
                shutil.rmtree(workdir, ignore_errors=True)
                removed.append(workdir)
            shutil.rmtree(infofile.parent, ignore_errors=True)
            found = True
        if not found:  # killed before dvc wrote its info file: at most a bare folder
            named = {Path(run.get("root_dir") or "").resolve() for _, run in infos}
            now = time.time()
            for folder in exps.glob("*/tmp*") if exps.is_dir() else []:
                age = folder.stat().st_mtime
                if folder.is_dir() and folder.resolve() not in named and \
                        started <= age <= now - BARE_AGE_S and _bare(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        marker.unlink(missing_ok=True)
        if not (found or removed):  # it ended (or never began) before its marker went
            continue
        cleaned.append(name)
        echo(f"removed the leftovers of the killed run {name}"
             + (f" ({', '.join(sorted(os.path.relpath(p, root) for p in removed))})"
                if removed else ""))
    return cleaned
