"""The student stages' errors (stages.student): non-finite teacher targets and losses told
apart, configs checked by the library calls too, a failed train without dulwich noise, and
frames too small for the encoder found while evaluating."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from any2seg import datasets
from any2seg.errors import PipelineError
from tests.cli_errors import ROOT, assert_work_fails_in_one_line
from tests.tiny_run import nan_scene_copy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_non_finite_teacher_targets_are_named_with_the_fix(sample_cache, tmp_path):
    from stages.student.config import TrainConfig
    from stages.student.model import StudentConfig
    from stages.student.train import train

    root, cache = sample_cache
    broken = nan_scene_copy(cache, tmp_path / "nan.zarr")
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(broken),
                      out=str(tmp_path / "run"), steps=2, batch_size=2, crop=64, workers=0,
                      val_limit=1)
    with pytest.raises(PipelineError) as err:
        train(StudentConfig(embed_dim=16), cfg, progress=False)
    msg = str(err.value)
    assert "L_cr = nan" in msg and f"teacher cache {broken} holds non-finite E_m/E_S" in msg
    assert "--overwrite" in msg and "lower train.lr" not in msg


def test_library_calls_are_validated_too(sample_cache, tmp_path):
    """train() and cache_teacher() check their configs before touching anything."""
    from stages.student.config import TrainConfig
    from stages.student.model import StudentConfig
    from stages.student.train import train
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, cache = sample_cache
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                      out=str(tmp_path / "run"), steps=0)
    with pytest.raises(PipelineError, match=r"^train.steps must be an integer >= 1"):
        train(StudentConfig(), cfg, progress=False)
    with pytest.raises(PipelineError, match=r"^teacher.scheduler must be local:N"):
        cache_teacher(TeacherConfig(root=str(root), out=str(tmp_path / "c.zarr"),
                                    scheduler="local:0"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


# ---------------------------------------------------------------------------------------
# a failing run exits without "Exception ignored" noise from DVC's git backend
# ---------------------------------------------------------------------------------------
BUG_IN_THE_LOOP = """
import sys
import stages.student.train as t

def broken(*args, **kwargs):
    raise RuntimeError("a bug inside the training loop")

t.supervised = broken
from pipeline.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_failed_train_in_a_git_repo_prints_no_dulwich_tracebacks(sample_cache, tmp_path):
    """dvclive opens the DVC repository (dulwich packs) and never closes it; a crash kept it
    alive until interpreter shutdown, where four "Exception ignored in ... __del__"
    tracebacks followed the real one."""
    root, cache = sample_cache
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (repo / "README").write_text("a project\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "a"],
                ["git", "gc", "-q"]):  # gc: objects in packs, as in a clone
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"embed_dim": 16},
        "train": {"cache": str(cache), "out": str(repo / "run"), "steps": 2, "batch_size": 2,
                  "crop": 64, "workers": 0, "val_limit": 1}}))
    result = subprocess.run([sys.executable, "-c", BUG_IN_THE_LOOP, "train", "--params",
                             str(params)], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "a bug inside the training loop" in result.stderr  # the real error is shown
    assert "Exception ignored" not in result.stderr, result.stderr[-2000:]


def test_non_finite_loss_causes_are_told_apart():
    """The message says what made the term non-finite, judged from what went into it."""
    from types import SimpleNamespace

    import torch

    from stages.student.config import TrainConfig
    from stages.student.data import Targets
    from stages.student.train import _likely_cause

    targets = Targets(visual=np.zeros((2, 1, 4), np.float32),
                      scene=np.zeros((2, 4), np.float32), classes=np.ones((3, 4), np.float32))
    cfg = TrainConfig(steps=1, lr=0.5, cache="c.zarr")
    ids = ["a", "b"]
    batch = {"index": torch.tensor([1, 0]), "label": torch.zeros(2, 2, 2, dtype=torch.long)}
    finite = SimpleNamespace(feats=[torch.zeros(2, 1, 4)], logits=torch.zeros(2, 3, 2, 2))
    diverged = SimpleNamespace(feats=[torch.full((2, 1, 4), float("inf"))],
                               logits=torch.zeros(2, 3, 2, 2))
    assert "training diverged (lower train.lr, now 0.5)" in \
        _likely_cause("L_sup", batch, diverged, targets, cfg, ids)
    blank = {**batch, "label": torch.full((2, 2, 2), 255)}
    assert "no labelled pixel" in _likely_cause("L_sup", blank, finite, targets, cfg, ids)
    assert "overflowed; lower train.lr" in _likely_cause("L_sup", batch, finite, targets, cfg,
                                                         ids)
    targets.scene[0, 1] = np.nan
    assert "holds non-finite E_m/E_S for a" in _likely_cause("L_cr", batch, finite, targets,
                                                             cfg, ids)
    targets.classes[2, 0] = np.inf
    assert "non-finite class embeddings E_C" in _likely_cause("L_se", batch, finite, targets,
                                                              cfg, ids)


# ---------------------------------------------------------------------------------------
# Inputs that pass every check of the settings and go wrong where the work happens (the pack
# rows of this table are in tests/library/test_write_errors.py; the runner is
# tests/cli_errors.py): (id, builder(tmp_path, deliver root) -> (arguments, Python run before
# the command), texts the one-line error must contain)

def _tiny_frames(tmp_path, root):
    """DELIVER frames of 24 x 32 px scored at their own size: below MiT's 29 px. The
    checkpoint is an untrained student (the frames are refused before it would matter)."""
    from dataclasses import asdict

    from stages.student.checkpoint import save_checkpoint
    from stages.student.model import StudentConfig, build_student

    reader = datasets.get("deliver")
    student = StudentConfig(embed_dim=16)
    mods = ["rgb", "depth", "event", "lidar"]
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, build_student(student, mods, len(reader.classes)), None, 0, 0.0,
                    {"student": asdict(student), "modalities": mods, "dataset": "deliver",
                     "classes": list(reader.classes),
                     "palette": [list(c) for c in reader.palette]})
    return ["evaluate", "--checkpoint", ckpt, "--dataset", "deliver", "--root", root,
            "--split", "train", "--protocol", "native", "--out", tmp_path / "metrics"], ""


WORK_CASES = [
    ("evaluate: frames smaller than MiT accepts", _tiny_frames,
     ["sample cloud/train/MAP_1_point1/000120 of deliver is scored at 32x24 px",
      "smaller than the student's encoder accepts (29 px on each side)", "--protocol official"]),
]


@pytest.mark.parametrize("case", WORK_CASES, ids=[c[0] for c in WORK_CASES])
def test_failure_during_the_work_is_one_line(case, deliver_root, tmp_path):
    assert_work_fails_in_one_line(case, deliver_root, tmp_path)
