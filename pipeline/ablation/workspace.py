"""Linked workspaces: where ablate runs when a pipeline reads data DVC does not hold.

`dvc exp run --temp` works in a copy holding what git tracks and the DVC outputs only, so
a data set or weights folder inside the repository that is in neither (the README's
`data/DELIVER` and `weights/`) is missing there, and DVC records even an absolute path
inside the repository relative to it; data outside the repository is there, but each copy
starts with an empty DVC state and hashes it all again. For such a pipeline each job of
ablate owns a workspace instead, `.dvc/tmp/ablate/ws-K/repo`: a `git clone --shared` of
the repository at the run's commit, with the user's uncommitted changes and untracked
`dvc.lock` copied in, the untracked inputs linked (a symlink each, so nothing is copied and
DVC hashes the same files), DVC's cache shared with the repository's, and the upstream
outputs (the teacher cache) checked out once per workspace, not once per run. The run is an
in-place `dvc exp run` there; its experiment ref is then fetched into the repository, so it
is an ordinary experiment of that commit (`dvc exp show`, `dvc exp apply NAME`), its
outputs in the shared cache.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from any2seg.errors import PipelineError
from pipeline.ablation.dag import Pipeline

HOME = Path(".dvc") / "tmp" / "ablate"  # relative to the repository root


def _run(cmd: list[str], cwd: Path, what: str) -> str:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        raise PipelineError(f"{what} failed in {cwd}: {lines[-1] if lines else 'no output'}")
    return result.stdout


def inputs_outside_dvc(root: Path, dag: Pipeline, target: str
                       ) -> tuple[list[str], list[str]]:
    """The inputs of the stages `target` runs that DVC does not hold: (inside the repository
    in neither git nor a DVC output, outermost only: what a `dvc exp run --temp` copy would
    lack; outside the repository: read in place, but hashed again by every --temp run, whose
    DVC state starts empty). A missing one is dvc status's to report."""
    outs = [o for stage in dag.stages.values() for o in stage.outs]
    inside, outside = [], []
    for name in dag.runs(target):
        for dep in dag.stages[name].deps:
            if any(dep == o or dep.startswith(o + "/") for o in outs) or \
                    not (root / dep).exists():
                continue
            if dep == ".." or dep.startswith("../"):
                outside.append(str((root / dep).resolve()))
            elif not _run(["git", "ls-files", "--", dep], root, "git ls-files").strip():
                inside.append(dep.rstrip("/"))
    links = [p for p in sorted(set(inside)) if not any(p.startswith(q + "/") for q in inside)]
    return links, sorted(set(outside))


def claim(root: Path, first: int) -> tuple[int, Path]:
    """Lock a free workspace slot (ws-first, ws-first+1, ...); returns the lock's file
    descriptor and the slot folder. The lock is an advisory flock the run's `dvc` process
    inherits, so a slot stays taken while its run lives, even after ablate is killed."""
    home = root / HOME
    home.mkdir(parents=True, exist_ok=True)
    for k in range(first, first + 64):
        fd = os.open(home / f"ws-{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd, home / f"ws-{k}"
    raise PipelineError(f"every workspace slot under {home} is in use by a running ablate; "
                        "wait for it to end")


def prepare(root: Path, slot: Path, rev: str, links: list[str], lock: str | None,
            checkout: list[str], dvc: str, outs: tuple[str, ...] = ()) -> Path:
    """Make `slot/repo` the repository at `rev` as the workspace has it (uncommitted
    changes of tracked files, the untracked dvc.lock `lock`), `links` linked to the
    repository's own folders, and the outputs of the stages `checkout` (`outs`, relative
    to the root) present; returns the workspace. Everything in it is ablate's own: a reset
    removes only what earlier runs left there."""
    repo = slot / "repo"
    if repo.exists() and subprocess.run(["git", "rev-parse", "--git-dir"], cwd=repo,
                                        capture_output=True).returncode != 0:
        shutil.rmtree(repo)  # a clone killed half-way: start it again
    if not repo.exists():
        slot.mkdir(parents=True, exist_ok=True)
        (slot / "prepared.json").unlink(missing_ok=True)  # a new clone: configure it again
        _run(["git", "clone", "--quiet", "--shared", "--no-checkout", str(root), str(repo)],
             slot, "git clone")
    _run(["git", "checkout", "--quiet", "--force", "--detach", rev], repo, "git checkout")
    refs = _run(["git", "for-each-ref", "--format=%(refname)", "refs/exps/"], repo,
                "git for-each-ref")
    for ref in refs.split():  # fetched already, or a killed run's: not this slot's to keep
        _run(["git", "update-ref", "-d", ref], repo, "git update-ref")
    shutil.rmtree(repo / ".dvc" / "tmp" / "exps", ignore_errors=True)
    exclude = repo / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text("".join(f"/{p}\n" for p in links))  # the links are never committed
    diff = subprocess.run(["git", "diff", "--binary", "HEAD"], cwd=root, capture_output=True)
    if diff.stdout.strip():  # as dvc exp run --temp: the workspace's uncommitted changes
        applied = subprocess.run(["git", "apply", "--whitespace=nowarn"], cwd=repo,
                                 input=diff.stdout, capture_output=True)
        if applied.returncode != 0:
            raise PipelineError(f"could not copy the uncommitted changes of {root} into the "
                                f"ablate workspace {repo}: {applied.stderr.decode().strip()}; "
                                "commit them first")
    if lock is not None:
        shutil.copy2(root / lock, repo / lock)
    for rel in links:
        link, target = repo / rel, (root / rel).absolute()
        if link.is_symlink():
            if Path(os.readlink(link)) == target:
                continue
            link.unlink()
        elif link.exists():
            raise PipelineError(f"{link} exists in the ablate workspace where a link to "
                                f"{target} belongs; remove {slot} and rerun")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target, target_is_directory=target.is_dir())
    # each `dvc` start costs about a second: the cache is configured and the upstream outputs
    # checked out when this workspace's record of them differs from what the last run here
    # had (a new workspace, another cache, another dvc.lock, an output gone), not every run
    cache = _cache_dir(root, dvc)
    stamp = slot / "prepared.json"
    locks = sorted({str(Path(a.rpartition(":")[0] or "dvc.yaml").parent / "dvc.lock")
                    for a in checkout})
    wanted = json.dumps({"cache": cache, "checkout": checkout, "locks": {
        rel: hashlib.sha256((repo / rel).read_bytes()).hexdigest() if (repo / rel).is_file()
        else None for rel in locks}})
    if stamp.is_file() and stamp.read_text() == wanted and \
            (repo / ".dvc" / "config.local").is_file() and \
            all((repo / out).exists() for out in outs):
        return repo
    stamp.unlink(missing_ok=True)
    _run([dvc, "config", "--local", "cache.dir", cache], repo, "dvc config")
    if checkout:
        _run([dvc, "checkout", "--quiet", *checkout], repo, "dvc checkout")
    stamp.write_text(wanted)
    return repo


@functools.cache
def _cache_dir(root: Path, dvc: str) -> str:
    """The repository's DVC cache folder, absolute (asked once per ablate)."""
    cache = _run([dvc, "cache", "dir"], root, "dvc cache dir").strip()
    return str(Path(root, cache).resolve())


def fetch(root: Path, repo: Path, rev: str, name: str) -> None:
    """Bring the experiment `name` of commit `rev` from the workspace into the repository."""
    ref = f"refs/exps/{rev[:2]}/{rev[2:]}/{name}"
    _run(["git", "fetch", "--quiet", "--no-tags", str(repo), f"+{ref}:{ref}"], root,
         f"fetching experiment {name}")
