"""Training against the teacher cache: damage, skipped samples, a cache that changed under
a run, and what a resumed run logs."""

import json
import shutil

import numpy as np
import pytest

from any2seg.errors import PipelineError
from any2seg.store import StoreDamage
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.train import train
from stages.teacher.run import TeacherConfig, cache_teacher
from tests.tiny_run import TINY_BACKBONE, TINY_STUDENT, logged
from tests.tiny_run import tiny as tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(root, cache, out, **kw):
    """The shared tiny run, 6 steps with a checkpoint every 2 (so a kill lands after one)."""
    return tiny_run(root, cache, out, **{"steps": 6, "checkpoint_every": 2, **kw})


class Killed(Exception):
    """Stands in for SIGKILL: the process stops after a step, nothing is cleaned up."""


def run_until(monkeypatch, cfg, steps_done, student=None):
    """Train until `steps_done` steps are logged, then stop as a kill would."""
    from dvclive import Live

    original, calls = Live.next_step, []

    def next_step(self):
        original(self)
        calls.append(1)
        if len(calls) == steps_done:
            raise Killed

    monkeypatch.setattr(Live, "next_step", next_step)
    with pytest.raises(Killed):
        train(student or TINY_STUDENT, cfg, progress=False)
    monkeypatch.setattr(Live, "next_step", original)


@pytest.fixture
def own(own_sample, tmp_path):
    """A private copy of the sample and a teacher cache of its train split."""
    copy = own_sample
    cache = tmp_path / "c.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(copy), out=str(cache),
                                teacher_root=str(copy / "teacher"), split=["train"],
                                rows_per_shard=8, batch_size=4))
    return copy, cache


def test_resumed_run_logs_each_step_once(sample_cache, tmp_path, monkeypatch):
    """Finding 5: after a kill and --resume, dvclive repeated or shifted steps. Killed after
    5 steps (checkpoint after 4, validation after 3), the resumed run logs exactly what an
    uninterrupted one does."""
    root, cache = sample_cache
    kw = dict(steps=6, checkpoint_every=2, val_every=3)
    run_until(monkeypatch, tiny(root, cache, tmp_path / "killed", **kw), steps_done=5)
    assert load_checkpoint_file(tmp_path / "killed" / "last.pt")["step"] == 4
    assert logged(tmp_path / "killed")["train/loss"]["steps"] == list(range(1, 6))
    resumed = train(TINY_STUDENT, tiny(root, cache, tmp_path / "killed", **kw), progress=False,
                    resume=True)
    assert resumed["start"] == 4
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "straight", **kw), progress=False)
    killed, straight = logged(tmp_path / "killed"), logged(tmp_path / "straight")
    assert killed["train/loss"]["steps"] == list(range(1, 7))
    assert killed["val/mIoU"]["steps"] == [3, 6]
    assert killed == straight  # same steps, same values, same summary
    assert killed["summary"]["step"] == 6


def test_resume_of_a_finished_run_says_so(sample_cache, tmp_path, capsys):
    from pipeline.cli import main

    root, cache = sample_cache
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"backbone": TINY_BACKBONE, "embed_dim": 32},
        "train": {"cache": str(cache), "out": str(tmp_path / "run"), "steps": 2,
                  "batch_size": 2, "crop": 64, "workers": 0, "val_limit": 1}}))
    for resume in ([], ["--resume"]):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", "--params", str(params), *resume])
        assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert "has finished: its last.pt is at step 2 of 2; nothing to resume" in out
    assert "Traceback" not in err


def test_resume_refuses_a_cache_that_changed(own, tmp_path, monkeypatch):
    """Finding 4: a run resumed on a rebuilt cache trained on targets of two teachers."""
    from any2seg import datasets
    from tests.teacher.test_cache_teacher import edit_image

    root, cache = own
    run_until(monkeypatch, tiny(root, cache, tmp_path / "a"), steps_done=3)
    # the data changed: cache-teacher recomputes a row, and the run may not resume
    edit_image(datasets.load("sample", root, "train")[0].files["rgb"])
    assert cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                       teacher_root=str(root / "teacher"), split=["train"],
                                       rows_per_shard=8, batch_size=4)).changed_rows == 1
    with pytest.raises(PipelineError, match=r"changed since .*last.pt was written: dataset "
                                            r"fingerprint .* rows were recomputed"):
        train(TINY_STUDENT, tiny(root, cache, tmp_path / "a"), progress=False, resume=True)
    # another teacher: the store is rebuilt with another class prompt
    run_until(monkeypatch, tiny(root, cache, tmp_path / "b"), steps_done=3)
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                teacher_root=str(root / "teacher"), split=["train"],
                                rows_per_shard=8, batch_size=4, class_prompt="a photo of {}",
                                overwrite=True))
    with pytest.raises(PipelineError) as err:
        train(TINY_STUDENT, tiny(root, cache, tmp_path / "b"), progress=False, resume=True)
    msg = str(err.value)
    assert "teacher class_prompt (\"{}\" at the checkpoint, \"a photo of {}\" now)" in msg
    assert "start a new --out" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["missing", "zero-length", "flipped byte", "truncated"])
def test_damaged_cache_stops_training_in_one_line(sample_cache, tmp_path, kind):
    """Findings 2 and 3: a missing, empty, flipped or truncated chunk trained silently on
    zeros or garbage (or ended in a zarr traceback)."""
    from tests.library.test_store import DAMAGE

    root, cache = sample_cache
    broken = tmp_path / "broken.zarr"
    shutil.copytree(cache, broken)
    chunk = broken / "visual" / "rgb" / "c" / "1" / "0"  # rows 16-31: train rows 16-23
    DAMAGE[kind][0](chunk)
    with pytest.raises(StoreDamage) as err:
        train(TINY_STUDENT, tiny(root, broken, tmp_path / "r"), progress=False)
    msg = str(err.value)
    assert msg.startswith(f"{broken} is damaged: visual/rgb rows 16-31 ({DAMAGE[kind][1]}")
    assert "\n" not in msg and f"--out {broken} --repair" in msg
    assert not (tmp_path / "r" / "last.pt").exists()


def test_skip_bad_cache_trains_without_the_skipped_samples(teacher_sample, tmp_path, caplog):
    """A cache built with --skip-bad was refused by train as "another sample list", and
    rebuilding gave the same refusal. The store records what it skipped; train skips it."""
    import logging

    from any2seg import datasets

    root, _ = teacher_sample
    copy = tmp_path / "sample"
    shutil.copytree(root, copy)
    bad = datasets.load("sample", copy, "train")[3]
    bad.files["lidar"].write_bytes(b"\x89PNG broken")
    cache = tmp_path / "c.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(copy), out=str(cache),
                                teacher_root=str(copy / "teacher"), split=["train"],
                                skip_bad=True))
    from any2seg.store import open_cache

    assert open_cache(cache).skipped == [bad.id] and bad.id not in open_cache(cache).ids
    with caplog.at_level(logging.INFO, logger="pipeline"):
        summary = train(TINY_STUDENT, tiny(copy, cache, tmp_path / "r", steps=2), progress=False)
    assert summary["status"] == "trained"
    assert "skipped 1 broken samples" in caplog.text and "1 train and 0 val" in caplog.text
    assert np.isfinite(summary["last_loss"])
