"""`pipeline predict` and `load_student`: the same classes as `pipeline evaluate` for the
same checkpoint, frame and subset; bad inputs refused in one line with nothing written."""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from any2seg import datasets
from any2seg.datasets import SampleSequence
from pipeline.cli import main
from stages.student.checkpoint import save_checkpoint
from stages.student.eval_config import EvalConfig
from stages.student.evaluate import (
    evaluation_loader,
    load_checkpoint,
    predict,
    subsets,
)
from stages.student.model import StudentConfig, build_student

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

MODS = ["rgb", "depth", "event", "lidar"]
SCENE = "cloud/val/MAP_1_point0"  # a scene of the small sample's val split (2 frames)


def tiny_checkpoint(path: Path, variant: str = "author", missing: str = "exclude",
                    seed: int = 0, backbone: str = "mit_b0") -> Path:
    """A random-weight student of the smallest settings the tests use, saved as
    `pipeline train` saves one (random weights: prediction does not care how they came)."""
    torch.manual_seed(seed)
    student = StudentConfig(backbone=backbone, embed_dim=16, mff={"variant": variant},
                            missing=missing)
    model = build_student(student, MODS, 25)
    reader = datasets.get("sample")
    meta = {"student": asdict(student), "train": {"dtype": "float32"}, "modalities": MODS,
            "classes": list(reader.classes), "dataset": "sample", "steps": 0,
            "palette": [list(c) for c in reader.palette]}
    save_checkpoint(path, model, None, 0, 0.0, meta)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt")


def run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def labels_of(out: Path, frame_id: str) -> np.ndarray:
    img = Image.open(out / "labels" / f"{frame_id}.png")
    assert img.mode == "P"  # a picture in the data set's colours, the classes as indices
    return np.asarray(img).astype(np.int64)


def evaluate_predictions(ckpt: Path, root: Path, limit: int, protocol: str | None = None,
                         scene: str | None = None
                         ) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """Per frame and subset, the classes `evaluate` scores: its loader and its `predict`
    under every one of the 15 subsets at once, as `evaluate(..., settings=("miss",))`;
    the first `limit` frames of val, or those of `scene`."""
    model, meta = load_checkpoint(ckpt)
    cfg = EvalConfig(protocol=protocol)
    model.missing = cfg.resolved_missing("sample", model.missing)
    samples = datasets.load("sample", root, "val", modalities=meta["modalities"])
    if scene is not None:
        samples = SampleSequence(samples.name, [r for r in samples.records
                                                if r.id.startswith(scene + "/")],
                                 datasets.get("sample").decode, samples.classes,
                                 samples.modalities)
    samples = samples[:limit]
    masks = subsets(len(MODS))
    mask = torch.zeros(len(masks), len(MODS), dtype=torch.bool)
    for i, sub in enumerate(masks):
        mask[i, list(sub)] = True
    loader = evaluation_loader(samples, MODS, protocol=cfg.resolved_protocol("sample"))
    out: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        preds = predict(model, batch["images"], mask)
        for i, sub in enumerate(masks):
            out.setdefault(",".join(MODS[j] for j in sub), []).append(preds[i, 0].numpy())
    return samples.ids, out


@pytest.fixture(scope="module")
def evaluated(ckpt, small_sample):
    """`evaluate_predictions` of the first 3 val frames: every subset at once, so the cases
    below share one run (read-only)."""
    return evaluate_predictions(ckpt, small_sample[0], 3)


@pytest.mark.parametrize("subset", ["rgb", "depth,event", "rgb,depth,event,lidar"])
def test_predict_equals_evaluate_frame_by_frame(ckpt, evaluated, small_sample, tmp_path, capsys,
                                                subset):
    root, _ = small_sample
    ids, expected = evaluated
    out = tmp_path / "pred"
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--root", str(root), "--modalities",
                       subset, "--limit", "3", "--out", str(out), "--save-logits")
    assert code == 0, err
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["frames"] == 3 and summary["ids"] == ids
    assert summary["protocol"] == "native" and summary["missing"] == "exclude"
    classes = set()
    for frame_id, want in zip(ids, expected[subset], strict=True):
        got = labels_of(out, frame_id)
        np.testing.assert_array_equal(got, want)
        probs = np.load(out / "probs" / f"{frame_id}.npz")["probs"]
        assert probs.dtype == np.float16 and probs.shape == (25, *want.shape)
        assert Image.open(out / "overlays" / f"{frame_id}.png").size == want.shape[::-1]
        classes |= set(np.unique(got).tolist())
    assert len(classes) > 1  # not a constant map that any two runs would share


def test_official_protocol_black_frames_equal_evaluate(ckpt, small_sample, tmp_path, capsys,
                                                       monkeypatch):
    """Under the official protocol (resize to 96 here, DELIVER's 1024 in use) a missing
    modality is a black frame, as evaluate's MISS; folders of new frames and the Python
    entry point give the same classes as the data set split."""
    root, _ = small_sample
    monkeypatch.setattr(datasets.get("sample"), "official_eval_size", 96)
    ids, expected = evaluate_predictions(ckpt, root, 2, protocol="official", scene=SCENE)
    picked = range(len(ids))
    assert len(ids) == 2
    out = tmp_path / "pred"
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--protocol", "official",
                       "--rgb", str(root / "img" / SCENE), "--lidar", str(root / "lidar" / SCENE),
                       "--out", str(out))
    assert code == 0, err
    summary = json.loads((out / "predictions.json").read_text())
    assert summary["missing"] == "black" and summary["subset"] == ["R+L"]
    from stages.student.predict import load_student

    student = load_student(ckpt, config=EvalConfig(protocol="official"))
    for i in picked:
        frame = ids[i].rsplit("/", 1)[1]
        want = expected["rgb,lidar"][i]
        assert want.shape == (96, 96)
        np.testing.assert_array_equal(labels_of(out, frame), want)
        rgb = root / "img" / SCENE / f"{frame}_rgb_front.png"
        lidar = datasets.get("sample").decode_inputs(
            {"lidar": root / "lidar" / SCENE / f"{frame}_lidar_front.png"})["lidar"]
        labels, probs = student.predict({"rgb": rgb, "lidar": lidar})  # a path and an array
        np.testing.assert_array_equal(labels, want)
        assert probs.shape == (25, 96, 96) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
        np.testing.assert_array_equal(probs.argmax(0), labels)


def frames_folder(root: Path, top: str, kind: str, dest: Path, rename=None) -> Path:
    dest.mkdir(parents=True)
    for f in sorted((root / top / SCENE).iterdir()):
        name = rename(f.name) if rename else f.name
        if name:
            shutil.copy(f, dest / name)
    return dest


def test_bad_inputs_are_one_line_and_write_nothing(ckpt, small_sample, tmp_path, capsys):
    root, _ = small_sample
    rgb = frames_folder(root, "img", "rgb", tmp_path / "rgb")
    out = tmp_path / "out"
    cases = {
        "mismatched stems": (
            ["--depth", frames_folder(root, "depth", "depth", tmp_path / "depth_renamed",
                                      lambda n: "d" + n)],
            "share no frame: frames are matched by file stem"),
        "a missing modality": (
            ["--depth", frames_folder(root, "depth", "depth", tmp_path / "depth_one",
                                      lambda n: n if n.startswith("035550") else None)],
            "frame 035560 has rgb"),
        "an unknown modality": (
            ["--nir", frames_folder(root, "depth", "depth", tmp_path / "nir")],
            "nir is not one of them"),
        "an input folder that does not exist": (
            ["--event", tmp_path / "nowhere"], "does not exist"),
    }
    for name, (extra, expected) in cases.items():
        code, _, err = run(capsys, "--checkpoint", str(ckpt), "--rgb", str(rgb),
                           *map(str, extra), "--out", str(out))
        line = error_line(err)
        assert code == 1 and expected in line, (name, line)
        assert not out.exists() and not list(tmp_path.glob(".out.partial*")), name
    # a frame without its depth: --skip-bad predicts the complete ones
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--rgb", str(rgb), "--depth",
                       str(tmp_path / "depth_one"), "--skip-bad", "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "predictions.json").read_text())["ids"] == ["035550"]


def test_existing_output_is_never_clobbered_silently(ckpt, small_sample, tmp_path, capsys):
    root, _ = small_sample
    rgb = frames_folder(root, "img", "rgb", tmp_path / "rgb")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--rgb", str(rgb), "--out", str(out))
    assert code == 1 and "exists and is not empty; pass --overwrite" in error_line(err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--rgb", str(rgb), "--out", str(out),
                       "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["labels", "notes.txt", "overlays",
                                                      "predictions.json"]
    # --out inside an input folder would write predictions into the data
    code, _, err = run(capsys, "--checkpoint", str(ckpt), "--rgb", str(rgb), "--out",
                       str(rgb / "pred"))
    assert code == 1 and "inside the input" in error_line(err)


DAMAGED = """
import sys
from pipeline.cli import main
main(sys.argv[1:])
"""


def test_unreadable_file_is_named_and_nothing_is_written(ckpt, small_sample, tmp_path):
    """The second frame's RGB is truncated: the first was predicted already, yet --out
    never appears (damaged files are decoded in a subprocess, as native decoders may
    crash)."""
    root, _ = small_sample
    rgb = frames_folder(root, "img", "rgb", tmp_path / "rgb")
    victim = sorted(rgb.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:60])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", DAMAGED, "predict", "--checkpoint", str(ckpt),
                           "--rgb", str(rgb), "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert str(victim) in line and "corrupt or truncated" in line
    assert not out.exists() and list(tmp_path.iterdir()) == [rgb]


def test_every_reader_modality_has_an_input_option():
    from pipeline.cli.inference import INPUT_MODALITIES

    registered = {m for name in datasets.available() for m in datasets.get(name).modalities}
    assert registered == set(INPUT_MODALITIES)
