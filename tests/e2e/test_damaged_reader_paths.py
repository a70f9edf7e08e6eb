"""Damaged files through the reader paths past stage one: training with loader workers
(a worker's error must end the run in one line, not a traceback dump or a hang, and
`--skip-bad` must skip and count), evaluation, prediction, and MCubeS's PNG and .npy
readers. The
commands run in a subprocess (one for all of them, `tests.damage.pipelines`: each its own
exit status and output) over one tree that carries every kind of damage, one damaged file
per sample. The student is the tests' tiny one (`tests.tiny_run.TINY_BACKBONE`): what is
tested is the readers' paths, not the encoder."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from tests.damage import (
    bad_crc,
    bomb,
    error_line,
    jpeg,
    label_16bit,
    npy_bomb,
    npy_damaged_header,
    npy_object_array,
    npy_pickle,
    pipeline,
    pipelines,
    scramble_idat,
    truncated,
    zero_bytes,
)
from tests.tiny_run import TINY_BACKBONE

# train sample (by position) -> (top folder, file kind, damage); 6 of 8 damaged
TRAIN_DAMAGE = [("img", "rgb", scramble_idat), ("event", "event", truncated),
                ("lidar", "lidar", bad_crc), ("hha", "depth", zero_bytes),
                ("semantic", "semantic", jpeg), ("img", "rgb", bomb)]
VAL_DAMAGE = [("semantic", "semantic", label_16bit), ("img", "rgb", scramble_idat)]  # of 4


@pytest.fixture(scope="module")
def damaged_sample(tmp_path_factory):
    """(sample root, teacher cache built before the damage, params file, {split: files})."""
    from any2seg import datasets
    from any2seg.synth import SampleSpec, make_sample
    from stages.teacher.default.folders import write_default_teacher
    from stages.teacher.run import TeacherConfig, cache_teacher

    base = tmp_path_factory.mktemp("damaged_sample")
    root = base / "sample"
    make_sample(root, SampleSpec(size=64, train=8, val=4, test=4, frames_per_scene=2, seed=3),
                workers=1)
    write_default_teacher(base / "teacher")
    cache = base / "sample.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(cache),
                                teacher_root=str(base / "teacher"), split=["train", "val"]))
    damaged = {}
    for split, damage in (("train", TRAIN_DAMAGE), ("val", VAL_DAMAGE)):
        records = datasets.get("sample").index(root, split)
        damaged[split] = []
        for record, (top, kind, hurt) in zip(records, damage, strict=False):
            rel = record.id.rsplit("/", 1)
            path = root / top / rel[0] / f"{rel[1]}_{kind}_front.png"
            path.write_bytes(hurt(path.read_bytes()))
            damaged[split].append(str(path))
    params = base / "params.yaml"
    params.write_text(json.dumps({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"backbone": TINY_BACKBONE, "embed_dim": 32},
        "train": {"cache": str(cache), "steps": 1, "batch_size": 8, "crop": 64, "workers": 1,
                  "device": "cpu", "seed": 7, "checkpoint_every": 1}}))
    return root, cache, params, damaged


def test_training_evaluation_and_prediction_name_the_damaged_file(damaged_sample, tmp_path):
    root, _, params, damaged = damaged_sample
    every = damaged["train"] + damaged["val"]

    common = ["predict", "--checkpoint", tmp_path / "skip" / "best.pt", "--root", root,
              "--split", "val", "--device", "cpu"]
    stop, skip, evaluate, predict_stop, predict_skip = pipelines(
        ["train", "--params", params, "--out", tmp_path / "stop"],
        ["train", "--params", params, "--skip-bad", "--batch-size", "2", "--out",
         tmp_path / "skip"],
        ["evaluate", "--checkpoint", tmp_path / "skip" / "best.pt", "--root", root, "--split",
         "val", "--setting", "mss", "--device", "cpu", "--out", tmp_path / "metrics"],
        [*common, "--out", tmp_path / "stopped"],
        [*common, "--skip-bad", "--out", tmp_path / "predicted"], cwd=tmp_path)

    # a loader worker decodes the first batch (all 8 train samples): its error, one line
    line = error_line(stop)
    assert any(path in line for path in damaged["train"]), line
    assert "--skip-bad" in line  # train has the flag the hint names

    assert skip.returncode == 0, (skip.returncode, skip.stdout, skip.stderr)
    assert "Traceback" not in skip.stdout + skip.stderr
    assert f"{len(every)} samples skipped as bad (--skip-bad)" in skip.stdout, skip.stdout
    for path in every:  # each skipped sample is logged with its file
        assert sum(path in line for line in skip.stderr.splitlines()) == 1, (path, skip.stderr)

    # evaluation decodes in-process: the first damaged val file, with the hint that fits
    line = error_line(evaluate)
    assert any(path in line for path in damaged["val"]), line
    assert "--skip-bad" not in line and "pipeline datasets check" in line, line

    # prediction decodes in-process too; it has --skip-bad, which skips and counts
    line = error_line(predict_stop)
    assert any(path in line for path in damaged["val"]), line
    assert "--skip-bad" in line
    assert not (tmp_path / "stopped").exists()  # nothing published from a failed run
    assert predict_skip.returncode == 0, (predict_skip.returncode, predict_skip.stdout,
                                          predict_skip.stderr)
    assert "Traceback" not in predict_skip.stdout + predict_skip.stderr
    assert f"{len(damaged['val'])} skipped" in predict_skip.stdout, predict_skip.stdout
    summary = json.loads((tmp_path / "predicted" / "predictions.json").read_text())
    reasons = " ".join(s["reason"] for s in summary["skipped"])
    assert all(path in reasons for path in damaged["val"]), reasons


def _slot_dying(index: int) -> int:
    os.kill(os.getpid(), signal.SIGSEGV)
    return index


class _Dying(torch.utils.data.Dataset):
    """A dataset whose item kills its process, as a native crash on a file would."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> int:
        return _slot_dying(index)


def test_a_worker_killed_by_a_signal_becomes_one_line():
    from any2seg.errors import PipelineError
    from stages.student.data import WorkerErrors

    loader = torch.utils.data.DataLoader(_Dying(), num_workers=1)
    with pytest.raises(PipelineError, match=r"^a data loader worker died \(DataLoader worker "
                                            r"\(pid.*\bpipeline datasets check\b"):
        list(WorkerErrors(loader))


# MCubeS: name -> (folder, extension, damage); every damaged file in its own sample
MCUBES_DAMAGE = {
    "extra_0": ("polL_color", ".png", scramble_idat),
    "extra_1": ("NIR_warped", ".png", truncated),
    "extra_2": ("GT", ".png", bad_crc),
    "extra_3": ("polL_aolp_sin", ".npy", truncated),
    "extra_4": ("polL_aolp_cos", ".npy", npy_damaged_header),
    "extra_5": ("polL_dolp", ".npy", npy_object_array),
    "extra_6": ("polL_dolp", ".npy", npy_pickle),
    "extra_7": ("polL_aolp_sin", ".npy", npy_bomb),
    "extra_8": ("polL_aolp_cos", ".npy", zero_bytes),
}
MCUBES_FOLDERS = ("polL_color", "polL_aolp_sin", "polL_aolp_cos", "polL_dolp", "NIR_warped",
                  "GT")


def test_mcubes_png_and_npy_damage_is_named(tmp_path):
    from tests.layouts import MCUBES_LISTS, write_mcubes

    root = tmp_path / "multimodal_dataset"
    write_mcubes(root)
    source = MCUBES_LISTS["train"][0]
    files = []
    for name, (folder, ext, hurt) in MCUBES_DAMAGE.items():
        for each in MCUBES_FOLDERS:  # a copy of a good sample under a new name
            ext_of = ".png" if each in ("polL_color", "NIR_warped", "GT") else ".npy"
            shutil.copy(root / each / f"{source}{ext_of}", root / each / f"{name}{ext_of}")
        path = root / folder / f"{name}{ext}"
        path.write_bytes(hurt(path.read_bytes()))
        files.append(str(path))
    with open(root / "list_folder" / "train.txt", "a") as f:
        f.write("\n".join(MCUBES_DAMAGE) + "\n")

    check = pipeline("datasets", "check", "--dataset", "mcubes", "--root", root, cwd=tmp_path)
    assert check.returncode == 1, (check.returncode, check.stdout, check.stderr)
    assert "Traceback" not in check.stdout + check.stderr, check.stderr
    lines = check.stdout.splitlines()
    assert lines[-1].endswith(f"{len(files)} bad"), lines
    for path in files:
        assert sum(path in line for line in lines) == 1, (path, lines)
    said = {name: next(line for line in lines if f"/{name}." in line) for name in MCUBES_DAMAGE}
    assert "holds Python objects" in said["extra_5"] and "allow_pickle=False" in said["extra_5"]
    assert "those of a Python pickle" in said["extra_6"]
    assert "declares a float32 array of shape (100000, 100000)" in said["extra_7"]
    assert "damaged .npy header" in said["extra_4"]
    assert "empty file" in said["extra_8"]
