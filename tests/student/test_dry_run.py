"""`pipeline train --dry-run`: the resolved configuration with each value's source, the
steps, checkpoints, resume decision and a time estimate, with no weights or data needed
and nothing written."""

import json

import pytest

from pipeline.cli import main
from stages.student.estimate import STEP_TIMES, estimate
from stages.student.train import train
from tests.student.test_train_cache import run_until, tiny
from tests.tiny_run import MIT_STUDENT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dry(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dry-run", *map(str, args)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    return out


def setting(out, key):
    """`value # source` of the line `  key: ...` of the printed configuration."""
    line = next(line for line in out.splitlines() if line.strip().startswith(f"{key}:"))
    value, _, source = line.partition(" # ")
    return value.split(":", 1)[1].strip(), source.strip()


def test_needs_no_weights_or_data_and_writes_nothing(capsys, tmp_path, monkeypatch):
    """The DELIVER preset's settings, one flag, weights and data absent: every value is
    printed with where it came from, and what could not be counted is said."""
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "p.yaml"
    params.write_text(json.dumps({
        "dataset": {"name": "deliver", "root": str(tmp_path / "no-data")},
        "student": {"backbone": "mit_b2", "pretrained": str(tmp_path / "no-weights"),
                    "mff": {"variant": "author"}},
        "train": {"epochs": 200, "batch_size": 8, "crop": 1024, "device": "cuda",
                  "loss": {"w_cr": 0.5}}}))
    before = sorted(tmp_path.rglob("*"))
    out = dry(capsys, "--params", params, "--lr", "1e-4")
    assert sorted(tmp_path.rglob("*")) == before
    assert setting(out, "lr") == ("0.0001", "--lr")
    assert setting(out, "backbone") == ("mit_b2", str(params))
    assert setting(out, "w_cr") == ("0.5", str(params))  # a nested group, from the file
    assert setting(out, "w_se") == ("1.0", "default")  # ... and its defaults
    assert setting(out, "dataset") == ("deliver", f"{params} (dataset.name)")
    assert setting(out, "skip_bad") == ("false", "default")
    assert "steps: unknown (200 epochs of the train split, whose size is unknown)" in out
    assert f"data: deliver at {tmp_path / 'no-data'}: not readable here" in out
    assert "resume: fresh from step 0 (no --resume)" in out
    # the declared GPU figure, per step only (no step count)
    assert "estimate: 0.73 s per step (declared: 0.73 s for mit_b2, batch 8 x 4 modalities, " \
        "crop 1024, on cuda" in out
    assert "steps unknown, so no total" in out
    # --steps clears params' epochs, and says so
    out = dry(capsys, "--params", params, "--steps", "500")
    assert setting(out, "steps") == ("500", "--steps")
    assert setting(out, "epochs") == ("null", "cleared by --steps")
    assert "estimate: 6 min 5 s = 500 steps x 0.73 s per step (declared" in out


def test_plan_of_the_sample_run_and_its_resume_decision(sample_cache, tmp_path, capsys,
                                                        monkeypatch):
    """With data and cache present: the steps, the checkpoints each step would write, the
    measured CPU step time scaled to the run, and the decision a real run would make about
    OUT/last.pt (resume, fresh with the reason, finished)."""
    root, cache = sample_cache
    run = tmp_path / "run"
    cfg = tiny(root, cache, run)  # 6 steps, checkpoint every 2, batch 2, crop 64
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"backbone": "mit_b0", "embed_dim": 32},
        "train": {k: getattr(cfg, k) for k in (
            "cache", "out", "steps", "batch_size", "crop", "lr", "workers",
            "checkpoint_every", "val_every", "val_limit", "seed")} | {"device": "cpu"}}))
    out = dry(capsys, "--params", params, "--resume", "auto")
    assert "steps: 6 (train.steps)" in out
    assert f"modalities: rgb, depth, event, lidar (those of the teacher cache {cache})" in out
    assert f"checkpoints: {run / 'last.pt'} every 2 steps and at the end (3 writes" in out
    assert f"{run / 'best.pt'} at each validation (every 100 steps and at the end: 1)" in out
    expected = estimate("cpu", "mit_b0", 64, 2, 4, 6)
    assert f"estimate: {expected.line()}" in out
    assert "measured: 0.1792 s for mit_b0, batch 2 x 4 modalities, crop 128, on cpu" in out
    assert "scaled x 0.25 by batch x modalities x crop^2" in out
    assert f"resume: fresh from step 0 ({run / 'last.pt'} does not exist)" in out
    assert not run.exists()
    # killed after a checkpoint at step 4: a run would continue there
    run_until(monkeypatch, cfg, steps_done=5, student=MIT_STUDENT)  # the params file's
    monkeypatch.undo()
    out = dry(capsys, "--params", params, "--resume", "auto")
    assert f"resume: resume {run / 'last.pt'} at step 4 of 6" in out
    out = dry(capsys, "--params", params, "--resume", "auto", "--lr", "0.001")
    assert f"resume: fresh from step 0: {run / 'last.pt'} (step 4) does not continue this " \
        "run: train.lr (0.002 at the checkpoint, 0.001 now); starting fresh" in out
    out = dry(capsys, "--params", params, "--resume", "--lr", "0.001")
    assert "resume: refused: " in out and "was written with other settings" in out
    train(MIT_STUDENT, cfg, progress=False, resume="auto")
    out = dry(capsys, "--params", params, "--resume", "auto")
    assert f"resume: nothing to do: {run / 'last.pt'} has finished this run (step 6)" in out


def test_estimate_scales_the_nearest_step_time_and_names_its_basis():
    cpu = next(t for t in STEP_TIMES if t.device == "cpu" and t.backbone == "mit_b0")
    # twice the crop side, twice the batch, half the modalities: 4 x the pixels per step
    est = estimate("cpu", "mit_b0", cpu.crop * 2, cpu.batch * 2, cpu.modalities // 2, 1000)
    assert est.step_seconds == pytest.approx(cpu.seconds * 4)
    assert est.seconds == pytest.approx(cpu.seconds * 4000)
    assert est.basis.startswith(f"measured: {cpu.seconds:g} s for mit_b0")
    # eight ranks share a global batch (communication not counted, and said so)
    gpu = estimate("cuda:0", "mit_b2", 1024, 8, 4, 99_400, nproc=8)
    assert gpu.step_seconds == pytest.approx(0.73 / 8)
    assert "declared" in gpu.basis and "divided over 8 ranks" in gpu.basis
    assert gpu.line().startswith("2 h 31 min = 99,400 steps x")
    none = estimate("cpu", "mit_b5", 512, 8, 4, 10)
    assert none.seconds is None and none.line().startswith("no estimate: no step time for "
                                                           "mit_b5 on cpu")


@pytest.mark.parametrize("modalities", [None, ["rgb", "depth"]])
def test_train_split_is_counted_in_the_data_with_or_without_a_modality_list(
        teacher_sample, modalities):
    """`train.modalities: null` (every modality, the shipped default) is counted too: it
    once reached the reader as None and `pipeline ablate --dry-run` ended in a TypeError."""
    from stages.student.config import TrainConfig
    from stages.student.estimate import train_samples

    root, spec = teacher_sample
    cfg = TrainConfig(dataset="sample", root=str(root), modalities=modalities)
    assert train_samples(cfg, root) == (spec.train, f"counted in {root}")
