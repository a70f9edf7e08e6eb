"""Data-parallel training and sharded evaluation: 2 gloo ranks on CPU equal 1 process.

The runs compare in float64 (`train.dtype`): in float32 the reduction order of 2 ranks
(two partial sums of a batch gradient, then an all-reduce) differs from one process's by
round-off, and AdamW turns the round-off on the head's biases that BatchNorm cancels (whose
gradient is zero in exact arithmetic) into lr-sized steps; float64 leaves ~1e-11 there.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from any2seg.datasets import load as load_dataset
from pipeline.cli import main
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.config import TrainConfig
from stages.student.evaluate import evaluate, load_checkpoint
from stages.student.model import StudentConfig
from stages.student.train import train
from tests.tiny_run import TINY_BACKBONE

STEPS = 6
TRAIN = {"steps": STEPS, "batch_size": 4, "crop": 32, "lr": 2e-3, "workers": 0,
         "checkpoint_every": 2, "val_every": 3, "val_limit": 3, "seed": 7,
         "modality_dropout": 0.5, "dtype": "float64", "device": "cpu"}
STUDENT = {"backbone": "mit_b0", "embed_dim": 32, "dropout": 0.1}


# the teacher-code test's student: the translators are its subject, not the encoder
TINY = {**STUDENT, "backbone": TINY_BACKBONE}


# this process computes with one thread, as each rank does (OMP_NUM_THREADS=1)
pytestmark = pytest.mark.usefixtures("one_thread")


def _params(path, root, cache, out, student=STUDENT, **train_kw):
    path.write_text(json.dumps({
        "dataset": {"name": "sample", "root": str(root)}, "student": student,
        "train": {**TRAIN, "cache": str(cache), "out": str(out), **train_kw}}))
    return path


def _env():
    # one thread per rank (the 2 ranks share the cores); PYTHONPATH as the test's
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


def _pipeline(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=600, **kw)


def _children(pid):
    """Processes whose parent is `pid` (from /proc: Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _weights(run):
    return load_checkpoint_file(run / "last.pt")["model"]


@pytest.fixture(scope="module")
def two_ranks(sample_cache, tmp_path_factory):
    """An uninterrupted run of 2 gloo ranks x 2 samples (`pipeline train --nproc 2`)."""
    root, cache = sample_cache
    tmp = tmp_path_factory.mktemp("ddp")
    params = _params(tmp / "params.yaml", root, cache, tmp / "two")
    done = _pipeline("train", "--params", params, "--nproc", 2, "--json")
    assert done.returncode == 0, done.stderr
    return root, cache, tmp, params, json.loads(done.stdout)


@pytest.mark.slow
def test_two_ranks_train_the_weights_of_one_process(two_ranks):
    root, cache, tmp, _, summary = two_ranks
    assert summary["steps"] == STEPS and summary["status"] == "trained"
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache), out=str(tmp / "one"),
                      **TRAIN)
    one = train(StudentConfig(**STUDENT), cfg, progress=False)  # one thread (one_thread)
    assert one["first_loss"] == pytest.approx(summary["first_loss"], abs=1e-12)
    a, b = _weights(tmp / "one"), _weights(tmp / "two")
    assert a.keys() == b.keys()
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item()
             for k in a if a[k].is_floating_point()}
    worst = max(diffs, key=diffs.get)
    print(f"max |theta_2ranks - theta_1| = {diffs[worst]:.3g} ({worst})")
    # float64 round-off (see the module docstring), far below one step's change (~lr)
    assert diffs[worst] < 1e-9, (worst, diffs[worst])
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].is_floating_point())
    # the two runs validated to the same score (sharded validation, summed matrices)
    assert one["val_mIoU"] == summary["val_mIoU"]


@pytest.mark.slow
def test_two_ranks_train_the_code_loss_as_one_process(teacher_sample, tmp_path):
    """the teacher-code translators live outside the DDP module: their gradients are averaged
    by hand and their losses (L_code, L_decoded) are the global batch's mean, as the
    student's terms are."""
    from stages.teacher.run import cache_teacher
    from tests.teacher.test_cache_teacher import config

    root, _ = teacher_sample
    cache = tmp_path / "dense.zarr"  # the rows training reads (validation reads no targets)
    cache_teacher(config(root, cache, split=["train"], rows_per_shard=16, dense="codebook:16",
                         dense_passes=1))
    kw = {"steps": 3, "val_every": 0, "loss": {"w_teacher_code": 1.0, "w_teacher_decoded": 1.0}}
    params = _params(tmp_path / "p.yaml", root, cache, tmp_path / "two", TINY, **kw)
    done = _pipeline("train", "--params", params, "--nproc", 2)
    assert done.returncode == 0, done.stderr
    train(StudentConfig(**TINY), TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                                             out=str(tmp_path / "one"), **{**TRAIN, **kw}),
          progress=False)
    a, b = (load_checkpoint_file(tmp_path / run / "last.pt")
            for run in ("one", "two"))
    assert a["translators"] and a["translators"].keys() == b["translators"].keys()
    for part in ("model", "translators"):
        for key, value in a[part].items():
            if value.is_floating_point():
                assert (value - b[part][key]).abs().max().item() < 1e-9, (part, key)
    moved = [k for k, v in a["translators"].items() if "weight" in k]
    assert moved, "the translators have weights"


@pytest.mark.slow
def test_sharded_evaluate_equals_one_process_matrix_for_matrix(two_ranks):
    root, _, tmp, _, _ = two_ranks
    ckpt, out = tmp / "two" / "best.pt", tmp / "eval2"
    # 5 samples: the ranks score 3 and 2
    done = _pipeline("evaluate", "--checkpoint", ckpt, "--root", root, "--setting", "all",
                     "--limit", 5, "--examples", 2, "--device", "cpu", "--nproc", 2,
                     "--out", out, "--params", tmp / "params.yaml")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("mIoU") >= 1 and "wrote" in done.stdout
    shared = np.load(out / "confusion.npz")
    model, meta = load_checkpoint(ckpt)
    samples = load_dataset("sample", root, "val", modalities=meta["modalities"])[:5]
    alone = evaluate(model, samples, ("mss", "miss", "sensor"), examples=2)
    assert sorted(shared.files) == sorted(alone.confusion)
    assert len([k for k in alone.confusion if k.startswith("miss/")]) == 15
    assert any(k.startswith("sensor/") for k in alone.confusion)
    for key, matrix in alone.confusion.items():
        np.testing.assert_array_equal(shared[key], matrix, err_msg=key)
    assert int(alone.confusion["all"].sum()) == sum(int((s.label != 255).sum())
                                                    for s in samples)
    mss = json.loads((out / "mss.json").read_text())
    assert mss["mIoU"] == pytest.approx(alone.mss["mIoU"], abs=1e-12)


@pytest.mark.slow
def test_resume_under_two_ranks_after_both_are_killed(two_ranks):
    root, cache, tmp, _, _ = two_ranks
    run = tmp / "killed"
    params = _params(tmp / "killed.yaml", root, cache, run)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--params", str(params),
                             "--nproc", "2"], env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last = run / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.005)
    ranks = _children(proc.pid)
    assert len(ranks) == 2, "the launcher starts one process per rank"
    proc.send_signal(signal.SIGKILL)  # the launcher: its ranks go down with it
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in ranks):
        time.sleep(0.01)
    assert not any(_alive(pid) for pid in ranks), "ranks outlived their launcher"
    killed_at = load_checkpoint_file(last)["step"]
    assert 0 < killed_at < STEPS, "the kill must land mid-run"
    # what the DVC stage runs: every rank decides from the same last.pt (strict --resume
    # restores through the same code)
    done = _pipeline("train", "--params", params, "--nproc", 2, "--resume", "auto", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["start"] == killed_at
    a, b = _weights(run), _weights(tmp / "two")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_a_batch_that_does_not_divide_over_the_ranks_is_refused(sample_cache, tmp_path,
                                                                  capsys):
    root, cache = sample_cache
    params = _params(tmp_path / "p.yaml", root, cache, tmp_path / "run")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--params", str(params), "--nproc", "2", "--batch-size", "3"])
    _, err = capsys.readouterr()
    assert exit_.value.code == 1
    assert err.count("\n") == 1 and err.startswith("error: train.batch_size 3 does not "
                                                   "divide over 2 ranks")
    assert "multiple of 2" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_under_torchrun_a_failing_job_reports_once(sample_cache, tmp_path):
    """Both ranks refuse the batch; the error is printed once, with no rank traceback."""
    root, cache = sample_cache
    params = _params(tmp_path / "p.yaml", root, cache, tmp_path / "run", batch_size=3)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    done = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "pipeline",
                           "train", "--params", str(params)], env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train.batch_size 3 does not divide over 2 ranks; use a multiple "
                      "of 2 (the batch is the global batch, split across ranks)"], done.stderr
    # no rank's traceback (torchrun's own agent prints its ChildFailedError summary)
    assert "pipeline/cli/" not in done.stderr and "stages/student" not in done.stderr


def test_keyed_noise_follows_the_sample_not_the_batch_or_rank():
    """Dropout / drop-path masks are functions of (seed, step, position in the global batch):
    a rank holding rows 2-3 draws what one process draws for them; rates are the set p."""
    from torch import nn

    from stages.student.model import build_student
    from stages.student.noise import KeyedDropout, KeyedDropPath, sample_keys, using

    keys = sample_keys(7, 3, torch.arange(4))
    for layer in (KeyedDropout(0.3, False, salt=5), KeyedDropout(0.3, True, salt=6),
                  KeyedDropPath(0.3, salt=7)):
        layer.train()
        x = torch.ones(4, 64, 8, 8)
        with using(keys):
            whole = layer(x)
        with using(sample_keys(7, 3, torch.arange(2, 4))):  # rank 1 of 2, as in train
            share = layer(x[2:])
        assert torch.equal(whole[2:], share)
        with using(sample_keys(7, 4, torch.arange(4))):
            assert not torch.equal(layer(x), whole)  # another step, other masks
        many = torch.ones(4000, 16, 2, 2)
        with using(sample_keys(0, 0, torch.arange(4000))):
            out = layer(many)
        assert (out != 0).double().mean().item() == pytest.approx(0.7, abs=0.02)
        assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))  # scaled by 1 / keep
    model = build_student(StudentConfig(**STUDENT), ["rgb", "depth"], 5)
    assert not any(isinstance(m, nn.Dropout | nn.Dropout2d) and m.p > 0
                   for m in model.modules())
    assert any(isinstance(m, KeyedDropPath) and m.p > 0 for m in model.modules())
    assert any(isinstance(m, KeyedDropout) for m in model.modules())
