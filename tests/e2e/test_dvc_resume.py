"""A preempted `dvc repro` continues training where it stopped (the train stage's outputs
are persisted and its command is `pipeline train --resume auto`), and a params change
starts the run afresh, saying so."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dvc_project import clone_project, edit_params, ran
from tests.dvc_project import run as git_run
from tests.tiny_run import logged

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def repo(stage_one_project, tmp_path_factory):
    """The Any2Seg chain up to the teacher cache at the tests' tiny sizes, shared with
    test_dvc.py and test_ablate.py (tests/dvc_project.py: built once per run), cloned here;
    12 steps of training the tiny student (the student of every DVC test,
    tests/tiny_run.py) with a checkpoint every 3, committed."""
    source, _ = stage_one_project
    repo = clone_project(source, tmp_path_factory.mktemp("dvc_resume") / "project")
    edit_params(repo, train__steps=STEPS, train__checkpoint_every=3, train__val_every=4,
                train__val_limit=2)
    git_run(repo, "git", "commit", "-qam", "12 steps")  # params.yaml (dvc.lock is untracked)
    return repo


def env():
    # one thread in every run: CPU float results depend on the thread count
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1"}


def run(repo, *args):
    result = subprocess.run(args, cwd=repo, env=env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def kill_after_checkpoint(repo: Path, last: Path, timeout: float = 300) -> int:
    """Start `dvc repro train`, SIGKILL its whole process group (dvc and the trainer under
    it) once last.pt exists; return the step last.pt holds."""
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return torch.load(last, weights_only=False)["step"]


def test_a_killed_repro_continues_to_the_uninterrupted_weights(repo):
    run_dir, last = repo / "runs" / "sample", repo / "runs" / "sample" / "last.pt"
    killed_at = kill_after_checkpoint(repo, last)
    assert 0 < killed_at < STEPS, "the kill must land mid-run"
    out = run(repo, "dvc", "repro", "train")
    assert ran(out) == {"train"}
    assert f"resuming runs/sample/last.pt at step {killed_at} of {STEPS}" in out, out
    # the same run, uninterrupted, beside it (same settings but --out)
    straight = repo / "runs" / "straight"
    run(repo, sys.executable, "-m", "pipeline.cli", "train", "--out", str(straight))
    a = torch.load(last, weights_only=False)
    b = torch.load(straight / "last.pt", weights_only=False)
    assert a["step"] == b["step"] == STEPS
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    killed, clean = logged(run_dir), logged(straight)
    assert killed["train/loss"]["steps"] == list(range(1, STEPS + 1))
    assert killed["val/mIoU"]["steps"] == [4, 8, 12]
    assert killed == clean
    # finished with the same settings (a result-neutral key changed, so DVC reruns it):
    # recognised, nothing retrained (DVC unprotects a persisted output by copying it, so
    # the bytes are compared, not the modification time)
    before = last.read_bytes()
    edit_params(repo, train__workers=1)
    out = run(repo, "dvc", "repro", "train")
    assert "has finished this run (same settings, data, teacher and code)" in out, out
    assert "resuming" not in out and "starting fresh" not in out
    assert last.read_bytes() == before
    # another lr: a fresh run that says why, and its log holds only its own steps
    edit_params(repo, train__lr=0.0005)
    out = run(repo, "dvc", "repro", "train")
    assert f"runs/sample/last.pt (step {STEPS}) does not continue this run: train.lr " in out
    assert "starting fresh" in out and "resuming" not in out
    fresh = torch.load(last, weights_only=False)
    assert fresh["step"] == STEPS and fresh["meta"]["train"]["lr"] == 0.0005
    assert logged(run_dir)["train/loss"]["steps"] == list(range(1, STEPS + 1))
    assert any(not torch.equal(fresh["model"][k], a["model"][k]) for k in a["model"])
    assert "train" not in json.loads(run(repo, "dvc", "status", "--json"))
