"""Linked workspaces of `pipeline ablate` (a real run through them on the DELIVER layout:
tests/e2e/test_real_data_flow.py)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from any2seg.errors import PipelineError
from pipeline.ablation import workspace as ablation_workspace

DVC = str(Path(sys.executable).parent / "dvc")
ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
       "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1"}


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True, env={**os.environ, **ENV}).stdout


@pytest.fixture()
def repo(tmp_path):
    root = tmp_path / "project"
    (root / "data" / "big").mkdir(parents=True)
    (root / "data" / "big" / "frame.png").write_bytes(b"pixels")
    (root / "params.yaml").write_text("x: 1\n")
    (root / ".gitignore").write_text("/data/\n")
    git(root, "init", "-q")
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True, env={**os.environ, **ENV})
    git(root, "add", "-A")
    git(root, "commit", "-qm", "init")
    return root


def test_slots_are_exclusive_and_released(repo):
    fd0, slot0 = ablation_workspace.claim(repo, 0)
    fd1, slot1 = ablation_workspace.claim(repo, 0)  # ws-0 is held: the next one
    assert (slot0.name, slot1.name) == ("ws-0", "ws-1")
    os.close(fd0)
    fd2, slot2 = ablation_workspace.claim(repo, 0)
    assert slot2.name == "ws-0"
    for fd in (fd1, fd2):
        os.close(fd)


def test_a_workspace_is_the_commit_as_the_workspace_has_it(repo):
    rev = git(repo, "rev-parse", "HEAD").strip()
    (repo / "params.yaml").write_text("x: 2\n")  # uncommitted, as dvc exp run --temp takes it
    (repo / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # untracked
    fd, slot = ablation_workspace.claim(repo, 0)
    try:
        ws = ablation_workspace.prepare(repo, slot, rev, ["data/big"], "dvc.lock", [], DVC)
    finally:
        os.close(fd)
    assert ws == slot / "repo" and git(ws, "rev-parse", "HEAD").strip() == rev
    assert (ws / "params.yaml").read_text() == "x: 2\n"
    assert (ws / "dvc.lock").read_text() == (repo / "dvc.lock").read_text()
    link = ws / "data" / "big"
    assert link.is_symlink() and link.resolve() == (repo / "data" / "big").resolve()
    assert (link / "frame.png").read_bytes() == b"pixels"  # read in place, not copied
    cache = subprocess.run([DVC, "cache", "dir"], cwd=ws, capture_output=True, text=True)
    assert Path(cache.stdout.strip()).resolve() == (repo / ".dvc" / "cache").resolve()
    assert "data/big" not in git(ws, "status", "--porcelain")  # a link is never committed
    assert git(repo, "status", "--porcelain") == " M params.yaml\n?? dvc.lock\n"  # untouched

    # reused for the next run: an experiment ref and edits of the last run are gone, the
    # committed params come back once the user's change is committed
    git(ws, "update-ref", "refs/exps/ab/cdef/old-run", rev)
    (ws / "params.yaml").write_text("x: 99\n")
    git(repo, "commit", "-qam", "x=2")
    rev2 = git(repo, "rev-parse", "HEAD").strip()
    fd, slot = ablation_workspace.claim(repo, 0)
    try:
        ws = ablation_workspace.prepare(repo, slot, rev2, ["data/big"], None, [], DVC)
    finally:
        os.close(fd)
    assert git(ws, "rev-parse", "HEAD").strip() == rev2
    assert (ws / "params.yaml").read_text() == "x: 2\n"
    assert git(ws, "for-each-ref", "refs/exps/") == ""


def test_a_half_made_clone_is_made_again_and_a_foreign_file_is_refused(repo):
    rev = git(repo, "rev-parse", "HEAD").strip()
    slot = repo / ablation_workspace.HOME / "ws-0"
    (slot / "repo").mkdir(parents=True)  # a clone killed before git wrote anything
    ws = ablation_workspace.prepare(repo, slot, rev, [], None, [], DVC)
    assert git(ws, "rev-parse", "HEAD").strip() == rev
    (ws / "data").mkdir()
    (ws / "data" / "big").write_text("not a link")
    with pytest.raises(PipelineError, match="exists in the ablate workspace where a link"):
        ablation_workspace.prepare(repo, slot, rev, ["data/big"], None, [], DVC)
    assert (repo / "data" / "big" / "frame.png").read_bytes() == b"pixels"


def test_which_inputs_send_runs_to_linked_workspaces(repo, tmp_path):
    from pipeline.ablation.dag import load_pipeline

    outside = tmp_path / "DELIVER"
    outside.mkdir()
    (repo / "src").mkdir()
    (repo / "src" / "train.py").write_text("# code\n")
    (repo / "weights" / "LanguageBind_Image").mkdir(parents=True)
    git(repo, "add", "src")
    git(repo, "commit", "-qm", "code")
    (repo / "dvc.yaml").write_text(f"""stages:
  cache_teacher:
    cmd: teach
    deps: [data/big, weights, weights/LanguageBind_Image, {outside}]
    outs: [cache/store.zarr]
  train:
    cmd: train
    deps: [cache/store.zarr, src, data/big, data/missing]
    outs: [runs/best.pt]
""")
    dag = load_pipeline(repo / "dvc.yaml", repo, {}, repo / "params.yaml")
    links, far = ablation_workspace.inputs_outside_dvc(repo, dag, "train")
    # untracked in the repository: linked (weights/LanguageBind_Image inside weights);
    # tracked code, DVC outputs and a missing path are not; outside: read in place
    assert links == ["data/big", "weights"]
    assert far == [str(outside.resolve())]
    (repo / "dvc.yaml").write_text("stages:\n  train:\n    cmd: train\n    deps: [src]\n")
    dag = load_pipeline(repo / "dvc.yaml", repo, {}, repo / "params.yaml")
    assert ablation_workspace.inputs_outside_dvc(repo, dag, "train") == ([], [])


def test_a_reused_workspace_starts_dvc_only_when_its_record_changed(repo, tmp_path):
    """Each `dvc` start costs about a second per run: a workspace reused for the next run
    with the same dvc.lock and the upstream outputs present starts none; another dvc.lock
    or an output gone configures and checks out again."""
    calls = tmp_path / "dvc-calls"
    logging_dvc = tmp_path / "dvc"
    logging_dvc.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec {DVC} \"$@\"\n")
    logging_dvc.chmod(0o755)
    (repo / "dvc.yaml").write_text("stages:\n  cache_teacher:\n    cmd: mkdir -p store && "
                                   "echo row > store/rows\n    outs: [store]\n")
    subprocess.run([DVC, "repro", "-q"], cwd=repo, check=True, env={**os.environ, **ENV})
    git(repo, "add", "dvc.yaml", ".gitignore")
    git(repo, "commit", "-qm", "stage")  # dvc.lock stays untracked, as after a first repro
    rev = git(repo, "rev-parse", "HEAD").strip()

    def prepare():
        fd, slot = ablation_workspace.claim(repo, 0)
        try:
            return ablation_workspace.prepare(repo, slot, rev, ["data/big"], "dvc.lock",
                                              ["cache_teacher"], str(logging_dvc), ("store",))
        finally:
            os.close(fd)

    def started():
        said = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return [line.split()[0] for line in said]

    ws = prepare()
    assert started() == ["cache", "config", "checkout"]
    assert (ws / "store" / "rows").read_text() == "row\n"
    assert prepare() == ws and started() == []  # the next run: nothing to redo
    (ws / "dvc.lock").write_text((ws / "dvc.lock").read_text() + "\n")  # a run's edits
    assert started() == [] and prepare() == ws and started() == []  # reset from the repo's
    shutil.rmtree(ws / "store")  # an output gone
    prepare()
    assert started() == ["config", "checkout"] and (ws / "store" / "rows").is_file()
    (repo / "store" / "rows").write_text("another row\n")  # stage one rerun: another lock
    subprocess.run([DVC, "commit", "-f", "-q"], cwd=repo, check=True, env={**os.environ, **ENV})
    prepare()
    assert started() == ["config", "checkout"]
    assert (ws / "store" / "rows").read_text() == "another row\n"
