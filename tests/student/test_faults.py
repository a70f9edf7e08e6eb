"""Faults of the training run folder: two trainers on one --out, and a full disk while a
checkpoint is written. Each ends in one clear line and never in a silent wrong result."""

import errno

import pytest
import torch

from any2seg import diskspace
from any2seg.errors import PipelineError
from stages.student import train as train_module
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.train import train
from tests.tiny_run import TINY_STUDENT, tiny

KW = dict(steps=2, checkpoint_every=1, val_every=0)


@pytest.fixture(scope="module")
def straight(sample_cache, tmp_path_factory):
    """The uninterrupted tiny run every faulty run is compared with."""
    root, cache = sample_cache
    out = tmp_path_factory.mktemp("straight")
    train(TINY_STUDENT, tiny(root, cache, out, **KW), progress=False)
    ckpt = load_checkpoint_file(out / "last.pt")
    ckpt["out"] = out
    return ckpt


def assert_same_weights(run, reference):
    got = load_checkpoint_file(run / "last.pt")
    assert got["step"] == reference["step"]
    for key, value in reference["model"].items():
        assert torch.equal(got["model"][key], value), key


def test_second_trainer_on_one_run_folder_is_refused(sample_cache, straight, tmp_path,
                                                     monkeypatch):
    root, cache = sample_cache
    out = tmp_path / "run"
    real = train_module.save_checkpoint
    refusals = []

    def save_and_start_a_second_trainer(path, *args, **kw):
        real(path, *args, **kw)
        if not refusals:  # while the first trainer runs, a second one on the same --out
            with pytest.raises(PipelineError) as err:
                train(TINY_STUDENT, tiny(root, cache, out, **KW), progress=False)
            refusals.append(str(err.value))

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_start_a_second_trainer)
    summary = train(TINY_STUDENT, tiny(root, cache, out, **KW), progress=False)
    assert summary["status"] == "trained"
    [msg] = refusals
    assert f"{out} is being written by pid " in msg and "--out" in msg and "\n" not in msg
    assert_same_weights(out, straight)
    assert not list(out.glob("*.tmp*"))


def _full_disk_save(calls):
    """torch.save that fills the disk on the second last.pt: part of the file, then the
    error torch's zip writer raises when fwrite fails (ENOSPC)."""
    real = torch.save

    def save(state, f, *args, **kw):
        if ".last.pt.tmp-" in str(f):
            calls.append(f)
            if len(calls) == 2:
                with open(f, "wb") as part:
                    part.write(b"PK" * 512)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                   "pos 1024 vs 0")
        return real(state, f, *args, **kw)
    return save


@pytest.mark.parametrize("how", ["fails mid-write", "too little free space"])
def test_full_disk_while_checkpointing_keeps_the_last_checkpoint(sample_cache, straight,
                                                                  tmp_path, monkeypatch, how):
    root, cache = sample_cache
    out = tmp_path / "run"
    calls = []
    if how == "fails mid-write":
        monkeypatch.setattr(torch, "save", _full_disk_save(calls))
    else:
        real_free = diskspace.free_bytes

        def free(folder):  # room for the first last.pt (and best.pt), not the second one
            return real_free(folder) if len(calls) < 1 else 1000

        real_save = train_module.save_checkpoint

        def count(path, *args, **kw):
            real_save(path, *args, **kw)
            if path.name == "last.pt":
                calls.append(path)

        monkeypatch.setattr(diskspace, "free_bytes", free)
        monkeypatch.setattr(train_module, "save_checkpoint", count)
    with pytest.raises(PipelineError) as err:
        train(TINY_STUDENT, tiny(root, cache, out, **KW), progress=False)
    msg = str(err.value)
    assert f"no space left on the disk of {out}" in msg and "needs about" in msg, msg
    assert "\n" not in msg
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    assert load_checkpoint_file(out / "last.pt")["step"] == 1  # kept intact
    if how == "fails mid-write":  # space freed: --resume ends where an uninterrupted run ends
        monkeypatch.undo()
        summary = train(TINY_STUDENT, tiny(root, cache, out, **KW), progress=False, resume=True)
        assert summary["start"] == 1
        assert_same_weights(out, straight)


def test_disk_full_is_recognised_through_wrappers():
    assert diskspace.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = RuntimeError("h5py write failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert diskspace.is_disk_full(wrapped)
    assert not diskspace.is_disk_full(OSError(errno.EACCES, "Permission denied"))


@pytest.mark.parametrize("how", ["fails mid-write", "too little free space"])
def test_full_disk_while_packing_is_one_line_and_leaves_no_file(deliver_root, tmp_path,
                                                                 monkeypatch, capsys, how):
    import h5py

    from tests.cli_errors import assert_one_line_error, run_cli

    root, _ = deliver_root
    out = tmp_path / "packs" / "deliver.h5"
    if how == "fails mid-write":
        real = h5py.Dataset.__setitem__

        def setitem(self, key, value):  # the error h5py raises when HDF5's write(2) fails
            if self.name.endswith("/bytes"):
                raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, "
                              "error message = 'No space left on device')")
            return real(self, key, value)
        monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    else:
        monkeypatch.setattr(diskspace, "free_bytes", lambda folder: 1000)
    code, _, err = run_cli(capsys, ["pack", "--dataset", "deliver", "--root", root,
                                    "--out", out])
    assert_one_line_error(code, err, f"no space left on the disk of {out.parent}",
                          "needs about")
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_resume_with_other_settings_names_them(sample_cache, straight, tmp_path):
    import shutil
    from dataclasses import replace

    root, cache = sample_cache
    out = tmp_path / "run"
    shutil.copytree(straight["out"], out)
    other = replace(TINY_STUDENT, embed_dim=16)
    with pytest.raises(PipelineError) as err:
        train(other, tiny(root, cache, out, **{**KW, "steps": 3, "lr": 1e-3}), progress=False,
              resume=True)
    msg = str(err.value)
    assert "student.embed_dim (32 at the checkpoint, 16 now)" in msg, msg
    assert "train.lr (0.002 at the checkpoint, 0.001 now)" in msg, msg
    assert "train.steps" in msg and "\n" not in msg


def test_evaluate_out_inside_the_data_set_is_refused(sample_cache, straight, capsys):
    from tests.cli_errors import assert_one_line_error, run_cli

    root, _ = sample_cache
    before = sorted(root.rglob("*"))
    for out in (root, root / "metrics"):
        code, _, err = run_cli(capsys, ["evaluate", "--checkpoint", straight["out"] / "best.pt",
                                        "--root", root, "--out", out, "--device", "cpu"])
        assert_one_line_error(code, err, f"--out {out} is inside the data set root {root}")
    assert sorted(root.rglob("*")) == before
