"""The project's DVC pipeline in a temporary git repository at the tests' tiny sizes, built
once per test run and copied per module (tests/e2e/test_dvc.py, tests/e2e/test_ablate.py).

Stage one (sample, fitted teacher, teacher cache) is what every end-to-end DVC test needs
before it does anything of its own, and it is the expensive part; `stage_one_project` builds
it once for all pytest-xdist workers (the first one to ask builds, the other waits on a
lock) and `clone_project` gives a module its own copy to run and edit.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from tests.tiny_run import TINY_BACKBONE

ROOT = Path(__file__).resolve().parents[1]

# the root params.yaml at the smallest sizes that still run each stage's code: 8/4/2 frames
# of 64 px (2 per scene, so CodeAlign's scene split has scenes to deal), a one-layer teacher
# fit, the tiny student (tests/tiny_run.py), 3 training steps, evaluation of 2 frames, 2 steps
# per CodeAlign stage
TINY_PARAMS = dict(
    dataset__sample__size=64, dataset__sample__train=8, dataset__sample__val=4,
    dataset__sample__test=2, dataset__sample__frames_per_scene=2,
    teacher__rows_per_shard=8, teacher__fit__hidden=16, teacher__fit__layers=1,
    teacher__fit__projection=16, teacher__fit__image_size=32, teacher__fit__image_epochs=1,
    teacher__fit__branch_epochs=1,
    student__backbone=TINY_BACKBONE, student__embed_dim=16,
    train__steps=3, train__batch_size=2, train__crop=64, train__workers=0,
    train__val_limit=1, train__checkpoint_every=3, train__val_every=0,
    eval__limit=2, eval__examples=1, eval__setting="all",
    codealign__stage0_steps=2, codealign__stage1_steps=2, codealign__stage2_steps=2,
    codealign__batch_size=2, codealign__translator_dim=8, codealign__translator_blocks=1,
    codealign__aligner_blocks=1)
STAGE_ONE = {"sample", "teacher", "cache_teacher"}


def command_env() -> dict[str, str]:
    """The environment of the commands the end-to-end tests start: the venv's `dvc` and
    `pipeline` first on PATH, no analytics, a git identity, and one torch thread per process
    unless the caller chose (the models are tiny, so a second thread only adds overhead, and
    under `make test`'s two workers on two cores two threads each oversubscribe the cores,
    where OpenMP's spin-waiting made a forward pass up to 40x slower)."""
    return {"OMP_NUM_THREADS": "1", **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run(repo: Path, *args: str, check: bool = True) -> str:
    """`args` in `repo` (`command_env`); stdout + stderr."""
    result = subprocess.run(args, cwd=repo, env=command_env(), capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


def edit_params(repo: Path, params: str = "params.yaml", **changes) -> None:
    """Set `group__key__sub=value` entries of `repo/params`."""
    path = repo / params
    data = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        group, *keys = dotted.split("__")
        node = data[group]
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def ran(output: str) -> set[str]:
    """The stages a `dvc repro`/`dvc exp run` output says it ran."""
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage")}


def copy_project(repo: Path, *extra: str) -> None:
    """The project's pipeline files, presets and the code its stages depend on, into `repo`
    (plus the `extra` folders, such as `pipelines` for the DELIVER preset)."""
    repo.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    for folder in ("configs", "any2seg", "pipeline", "stages", *extra):  # code deps
        shutil.copytree(ROOT / folder, repo / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))


def clone_project(source: Path, repo: Path) -> Path:
    """A private copy of a built repository (git history, DVC cache, outputs, times kept:
    DVC sees the same files, so nothing it recorded reruns)."""
    dvc_dir = source / ".dvc"

    def dvc_tmp(folder: str, names: list[str]) -> list[str]:  # DVC's locks and temp runs
        return ["tmp"] if Path(folder) == dvc_dir else []

    shutil.copytree(source, repo, symlinks=True, ignore=dvc_tmp)
    return repo


def build_stage_one(repo: Path) -> str:
    """The tiny pipeline committed to git, then `dvc repro cache_teacher` (sample, teacher
    fit, teacher cache; dvc.lock left uncommitted, as after a first `dvc repro`). Returns
    that repro's output."""
    copy_project(repo)
    edit_params(repo, **TINY_PARAMS)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny pipeline")
    return run(repo, "dvc", "repro", "cache_teacher")


def shared_build(root: Path, name: str, build: Callable[[Path], str]) -> tuple[Path, str]:
    """`build(root/name)` once for every process that asks with the same `root` (the
    pytest-xdist workers of one run share their basetemp's parent): the first builds under
    an exclusive lock, the others wait and reuse it; a build that failed is retried.
    Returns the folder and what the build returned (its output)."""
    folder, output = root / name, root / f"{name}.out"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not output.exists():
            shutil.rmtree(folder, ignore_errors=True)
            text = build(folder)
            output.write_text(text)
    return folder, output.read_text()
