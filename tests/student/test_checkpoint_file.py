"""Checkpoints are read without running code: a crafted file whose pickle would create a
file is refused in one line by every reader (evaluate, train --resume, each CodeAlign
stage that reads one), and the file is never created; what the pipeline writes, and
the format-2 files written before metadata was made plain, still read back."""

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from any2seg.errors import PipelineError
from stages.student.checkpoint import restore, save_checkpoint
from stages.student.checkpoint_file import load_checkpoint_file, plain
from tests.cli_errors import assert_one_line_error, run_cli


def crafted(path: Path, target: Path) -> Path:
    """A checkpoint of our layout whose `meta` unpickles, with weights_only=False, by
    calling open(target, "w"): the file `target` appears."""

    class Payload:
        def __reduce__(self):
            return (open, (str(target), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"version": 2, "step": 1, "best": 0.0, "meta": Payload(),
                "model": {"w": torch.zeros(2)}}, path)
    return path


def test_the_crafted_checkpoint_runs_its_code_when_loaded_unsafely(tmp_path):
    """The control: the payload is live, so the refusals below are what keeps it out."""
    target = tmp_path / "created"
    path = crafted(tmp_path / "evil.pt", target)
    torch.load(path, weights_only=False)
    assert target.exists()
    target.unlink()
    with pytest.raises(PipelineError) as refused:
        load_checkpoint_file(path, "retrain")
    msg = str(refused.value)
    assert str(path) in msg and "`io.open`" in msg and "refused unread" in msg, msg
    assert msg.endswith("; retrain") and "\n" not in msg and not target.exists()


def test_evaluate_refuses_it(small_sample, tmp_path, capsys, monkeypatch):
    root, _ = small_sample
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "created"
    path = crafted(tmp_path / "run" / "best.pt", target)
    code, _, err = run_cli(capsys, ["evaluate", "--checkpoint", path, "--root", root,
                                    "--out", tmp_path / "metrics"])
    assert_one_line_error(code, err, str(path), "refused unread", "`io.open`",
                          "evaluate a checkpoint `pipeline train` wrote")
    assert not target.exists()


def test_train_resume_refuses_it(sample_cache, tmp_path, capsys, monkeypatch):
    root, cache = sample_cache
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "created"
    path = crafted(tmp_path / "run" / "last.pt", target)
    code, _, err = run_cli(capsys, ["train", "--root", root, "--cache", cache, "--out",
                                    path.parent, "--resume", "--steps", "2", "--crop", "64",
                                    "--batch-size", "2", "--workers", "0"])
    assert_one_line_error(code, err, str(path), "refused unread", "`io.open`",
                          "move it away to start this run again")
    assert not target.exists()


@pytest.mark.parametrize("command,read", [
    ("stage0", "stage0/group0.last.pt"),  # a part's resume checkpoint (every stage's)
    ("stage1", "stage0.pt"), ("stage2", "stage1.pt"), ("evaluate", "stage2.pt")])
def test_codealign_stages_refuse_it(command, read, small_sample, tmp_path, capsys,
                                    monkeypatch):
    root, _ = small_sample
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("student: {embed_dim: 16}\ncodealign: {groups: [[rgb], [depth]], "
                      "crop: 32, batch_size: 2}\n")
    target = tmp_path / "created"
    out = tmp_path / "codealign"
    path = crafted(out / read, target)
    code, _, err = run_cli(capsys, ["codealign", command, "--dataset", "sample", "--root",
                                    root, "--out", out, "--params", params])
    assert_one_line_error(code, err, str(path), "refused unread", "`io.open`")
    assert not target.exists()


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "best.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(PipelineError, match="is not a readable checkpoint") as refused:
        load_checkpoint_file(path, "retrain")
    assert str(path) in str(refused.value) and "\n" not in str(refused.value)


@dataclass
class _Settings:
    where: Path
    scale: np.float32


def test_plain_converts_what_metadata_holds_and_refuses_the_rest():
    meta = plain({"settings": _Settings(Path("runs/a"), np.float32(0.5)),
                  "ids": (np.int64(3), [np.bool_(True)]), "table": np.arange(3)})
    assert meta["settings"] == {"where": "runs/a", "scale": 0.5}
    assert meta["ids"] == (3, [True]) and type(meta["ids"][0]) is int
    assert torch.equal(meta["table"], torch.arange(3))
    state = torch.nn.Linear(2, 2).state_dict()
    assert plain(state) is state  # already plain: kept as it is, _metadata included
    schedule = torch.optim.lr_scheduler.MultiStepLR(torch.optim.SGD(
        torch.nn.Linear(1, 1).parameters(), lr=0.1), [3, 5]).state_dict()
    assert plain(schedule) is schedule  # its milestones are a Counter, which torch reads
    with pytest.raises(TypeError, match=r"checkpoint\['x'\]\[0\]: a builtins.set"):
        plain({"x": [{1, 2}]})
    with pytest.raises(TypeError, match="numpy.ndarray"):
        plain(np.array([None], dtype=object))


def test_what_save_checkpoint_writes_reads_back_and_restores(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "last.pt", model, opt, 3, 0.25,
                    {"student": {"backbone": "mit_b0"}, "where": Path("x")})
    expected = (np.random.random(), random.random(), torch.rand(1))
    ckpt = load_checkpoint_file(tmp_path / "last.pt")
    assert ckpt["meta"] == {"student": {"backbone": "mit_b0"}, "where": "x"}
    other = torch.nn.Linear(3, 2)
    assert restore(ckpt, other, torch.optim.AdamW(other.parameters()), None) == (3, 0.25)
    assert (np.random.random(), random.random()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])
    assert torch.equal(other.weight, model.weight)


def test_a_format_2_checkpoint_of_the_earlier_layout_still_loads(tmp_path):
    """Before metadata was made plain, `rng.numpy` was numpy's own tuple (a uint32 array):
    read with the allow-list, and resumed from to the same numpy stream."""
    np.random.seed(9)
    state = np.random.get_state()
    expected = np.random.random(3)
    model = torch.nn.Linear(2, 2)
    torch.save({"version": 2, "step": 1, "best": 0.0, "meta": {}, "model": model.state_dict(),
                "translators": None, "optimizer": None,
                "rng": {"torch": torch.get_rng_state(), "numpy": state,
                        "python": random.getstate(), "cuda": None}}, tmp_path / "old.pt")
    ckpt = load_checkpoint_file(tmp_path / "old.pt")
    assert isinstance(ckpt["rng"]["numpy"][1], np.ndarray)
    from stages.student.checkpoint_file import set_numpy_rng_state

    np.random.seed(0)
    set_numpy_rng_state(ckpt["rng"]["numpy"])
    assert np.array_equal(np.random.random(3), expected)
    torch.save({"x": np.array([1.5])}, tmp_path / "float.pt")  # only the RNG's uint32 arrays
    with pytest.raises(PipelineError, match="Float64DType"):
        load_checkpoint_file(tmp_path / "float.pt")


@pytest.mark.parametrize("command", ["predict", "export"])
def test_predict_and_export_refuse_it(command, small_sample, tmp_path, capsys, monkeypatch):
    """The commands that apply a checkpoint to new frames read it as evaluate does."""
    root, _ = small_sample
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "created"
    path = crafted(tmp_path / "run" / "best.pt", target)
    args = ["--rgb", root / "img"] if command == "predict" else ["--format", "onnx"]
    code, _, err = run_cli(capsys, [command, "--checkpoint", path, *args,
                                    "--out", tmp_path / "out"])
    assert_one_line_error(code, err, str(path), "refused unread", "`io.open`")
    assert not target.exists() and not (tmp_path / "out").exists()


def test_load_student_refuses_it(tmp_path):
    """The Python entry point users embed: the same refusal, as an exception."""
    from stages.student.predict import load_student

    target = tmp_path / "created"
    path = crafted(tmp_path / "best.pt", target)
    with pytest.raises(PipelineError, match="refused unread"):
        load_student(path)
    assert not target.exists()
