import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from any2seg.errors import PipelineError
from stages.student.checkpoint import CHECKPOINT_VERSION
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.config import TrainConfig
from stages.student.evaluate import load_checkpoint, subsets
from stages.student.model import StudentConfig
from stages.student.train import train
from tests.tiny_run import (
    MIT_STUDENT,
    TINY_BACKBONE,
    TINY_STUDENT,
    logged,
    nan_scene_copy,
    tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_few_steps_lower_the_loss(sample_cache, tmp_path):
    root, cache = sample_cache
    # 15 steps at 32-pixel crops end at ~0.48 x the first loss (30 steps at 64 px: 0.57)
    cfg = tiny(root, cache, tmp_path / "run", steps=15, crop=32,
               augment={"scale": [1.0, 1.0], "jitter": 0.0, "blur": 0.0})
    summary = train(MIT_STUDENT, cfg, progress=False)  # the default backbone really learns
    assert summary["last_loss"] < 0.8 * summary["first_loss"]
    for name in ("last.pt", "best.pt"):
        assert (tmp_path / "run" / name).is_file()
    logged = json.loads((tmp_path / "run" / "dvclive" / "metrics.json").read_text())
    assert "train" in logged and "val" in logged
    model, meta = load_checkpoint(tmp_path / "run" / "best.pt")
    assert meta["modalities"] == ["rgb", "depth", "event", "lidar"] and len(meta["classes"]) == 25


def test_the_progress_line_shows_the_last_validation(sample_cache, tmp_path, capsys,
                                                     monkeypatch):
    """Off a terminal the training line carries the last validation's mIoU (the demo's log
    shows the student learning), absent before the first validation."""
    from any2seg import progress

    monkeypatch.setattr(progress, "LINE_GAP_S", 0.0)  # a line at every 10 % of the steps
    root, cache = sample_cache
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "run", steps=4, val_every=2),
          progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("training: ")]
    assert "val_mIoU=" not in lines[0], lines
    final = float(lines[-1].rsplit("val_mIoU=", 1)[1])
    assert 0 <= final <= 100, lines


def test_resume_after_kill_ends_at_the_same_weights(sample_cache, tmp_path):
    """MiT itself (its drop-path noise must follow the step on resume), at 32-pixel crops;
    10 steps leave the kill room to land mid-run (it comes 0.3 s after the first last.pt)."""
    root, cache = sample_cache
    steps = 10
    kw = dict(steps=steps, crop=32, checkpoint_every=2, val_every=5, modality_dropout=0.5)
    cfg = tiny(root, cache, tmp_path / "killed", **kw)
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"backbone": MIT_STUDENT.backbone, "embed_dim": MIT_STUDENT.embed_dim},
        "train": {k: getattr(cfg, k) for k in (
            "cache", "out", "steps", "batch_size", "crop", "lr", "workers", "checkpoint_every",
            "val_every", "val_limit", "seed", "modality_dropout")}}))
    # the same thread count as this process: CPU float results depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--params",
                             str(params)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not last.exists():
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint_file(last)["step"]
    assert 0 < killed_at < steps, "the kill must land mid-run"
    resumed = train(MIT_STUDENT, cfg, progress=False, resume=True)
    assert resumed["start"] == killed_at
    train(MIT_STUDENT, tiny(root, cache, tmp_path / "straight", **kw), progress=False)
    a = load_checkpoint_file(tmp_path / "killed" / "last.pt")["model"]
    b = load_checkpoint_file(tmp_path / "straight" / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # dvclive: each step logged once, validation at the same steps, the real last step
    killed, straight = logged(tmp_path / "killed"), logged(tmp_path / "straight")
    assert killed["train/loss"]["steps"] == list(range(1, steps + 1))
    assert killed["val/mIoU"]["steps"] == straight["val/mIoU"]["steps"] == [5, 10]
    assert killed["summary"]["step"] == straight["summary"]["step"] == steps


def test_refusals(sample_cache, tmp_path):
    root, cache = sample_cache
    with pytest.raises(PipelineError, match="does not exist; build it"):
        train(TINY_STUDENT, tiny(root, tmp_path / "none.zarr", tmp_path / "r"), progress=False)
    # a cache of the val split only misses the training rows
    from stages.teacher.run import TeacherConfig, cache_teacher

    val_only = tmp_path / "val.zarr"
    cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(val_only),
                                teacher_root=str(root / "teacher"), split=["val"]))
    with pytest.raises(PipelineError, match="no rows for 24 samples"):
        train(TINY_STUDENT, tiny(root, val_only, tmp_path / "r"), progress=False)
    # rows that are not done
    import zarr

    partial = tmp_path / "partial.zarr"
    import shutil

    shutil.copytree(cache, partial)
    group = zarr.open_group(str(partial), mode="r+")
    done = group["done"][:]
    done[3] = False
    group["done"][:] = done
    with pytest.raises(PipelineError, match="not computed yet"):
        train(TINY_STUDENT, tiny(root, partial, tmp_path / "r"), progress=False)
    # the data changed after caching: another sample list
    group["done"][:] = np.ones_like(done)
    group.attrs["sample_list_fingerprint"] = "0123456789abcdef"
    with pytest.raises(PipelineError, match="another sample list"):
        train(TINY_STUDENT, tiny(root, partial, tmp_path / "r"), progress=False)
    with pytest.raises(PipelineError, match="no teacher embeddings for thermal|unknown modality"):
        train(TINY_STUDENT, tiny(root, cache, tmp_path / "r", modalities=["rgb", "thermal"]),
              progress=False)
    with pytest.raises(PipelineError, match="nothing to resume"):
        train(TINY_STUDENT, tiny(root, cache, tmp_path / "fresh"), progress=False, resume=True)
    # a last.pt of another checkpoint format, or no checkpoint of ours at all
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    other = CHECKPOINT_VERSION + 1
    for content, named in (({"version": other, "step": 1}, f"has format version {other}; "),
                           ({"weight": torch.zeros(1)}, "no checkpoint format version")):
        torch.save(content, foreign / "last.pt")
        with pytest.raises(PipelineError, match=named) as refused:
            train(TINY_STUDENT, tiny(root, cache, foreign), progress=False, resume=True)
        assert "\n" not in str(refused.value) and "start a new --out" in str(refused.value)
    with pytest.raises(PipelineError, match="train.steps or train.epochs"):
        TrainConfig.from_params({}, {})
    with pytest.raises(PipelineError, match="train.loss: unknown key 'w_xx'"):
        TrainConfig.from_params({"train": {"steps": 1, "loss": {"w_xx": 1}}}, {})


def test_non_finite_loss_names_step_and_term(sample_cache, tmp_path):
    root, cache = sample_cache
    broken = nan_scene_copy(cache, tmp_path / "nan.zarr")
    with pytest.raises(PipelineError, match="non-finite loss at step 0: L_cr = nan"):
        train(TINY_STUDENT, tiny(root, broken, tmp_path / "r", steps=3), progress=False)
    with pytest.raises(PipelineError, match="train.lr must be a finite number > 0"):
        TrainConfig.from_params({"train": {"steps": 1, "lr": -1.0}}, {})


def test_miss_enumerates_fifteen_subsets():
    subs = subsets(4)
    assert len(subs) == 15 and len(set(subs)) == 15
    assert subs[0] == (0,) and subs[-1] == (0, 1, 2, 3)
    assert len(subsets(2)) == 3


def test_evaluate_writes_metrics_and_pictures(sample_cache, tmp_path, capsys):
    from pipeline.cli import main

    root, cache = sample_cache
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "run", steps=2), progress=False)
    out = tmp_path / "metrics"
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(tmp_path / "run" / "best.pt"), "--root", str(root),
              "--setting", "all", "--limit", "6", "--examples", "2", "--out", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "| miss | mean_mIoU | R | D | E | L | R+D |" in printed
    mss = json.loads((out / "mss.json").read_text())
    assert {"mIoU", "mAcc", "mF1", "aAcc", "IoU_Road"} <= set(mss)
    miss = json.loads((out / "miss.json").read_text())
    assert len(miss) == 16 and "R+D+E+L" in miss and "mean_mIoU" in miss
    assert miss["R+D+E+L"] == mss["mIoU"]
    sensor = json.loads((out / "sensor.json").read_text())
    assert {"mean_of_groups_mIoU", "whole_split_mIoU", "cloud"} <= set(sensor)
    assert sensor["whole_split_mIoU"] == mss["mIoU"]
    for name in ("miss.png", "per_class_iou.png", "predictions.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    from PIL import Image

    grid = Image.open(out / "plots" / "predictions.png")
    assert grid.size[0] > grid.size[1] > 2 * 64  # 4 inputs + truth + prediction, 2 samples
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--checkpoint", str(tmp_path / "nope.pt"), "--root", str(root)])
    assert exit_info.value.code == 1
    assert "does not exist" in capsys.readouterr().err


def test_sliding_window_equals_whole_image_when_the_window_covers_it(sample_cache, tmp_path):
    from stages.student.evaluate import infer

    root, cache = sample_cache
    train(TINY_STUDENT, tiny(root, cache, tmp_path / "run", steps=1), progress=False)
    model, _ = load_checkpoint(tmp_path / "run" / "last.pt")
    images = torch.randn(1, 4, 3, 64, 64)
    masks = torch.ones(1, 4, dtype=torch.bool)
    whole = infer(model, images, masks, "whole")
    slide = infer(model, images, masks, "slide", crop=64, stride=32)
    torch.testing.assert_close(whole, slide)
    tiles = infer(model, images, masks, "slide", crop=32, stride=16)
    assert tiles.shape == whole.shape and not torch.allclose(tiles, whole)


@pytest.mark.parametrize("variant,se_features", [("author", "fused"), ("paper", "fused"),
                                                 ("pixel", "decoder")])
def test_every_mff_variant_trains_with_all_three_losses_and_evaluates(
        sample_cache, tmp_path, variant, se_features):
    """Each variant reaches L_cr and L_se (non-zero, finite) and its checkpoint evaluates;
    `author` has no head features before fusion, so `decoder` is refused for it."""
    from any2seg import datasets
    from stages.student.evaluate import evaluate, flat_metrics

    root, cache = sample_cache
    student = StudentConfig(backbone=TINY_BACKBONE, embed_dim=16, mff={"variant": variant})
    cfg = tiny(root, cache, tmp_path / "run", steps=2, checkpoint_every=2,
               loss={"se_features": se_features})
    summary = train(student, cfg, progress=False)
    logged = json.loads((tmp_path / "run" / "dvclive" / "metrics.json").read_text())
    assert logged["train"]["L_cr"] > 0 and logged["train"]["L_se"] > 0
    assert np.isfinite(summary["last_loss"])
    model, meta = load_checkpoint(tmp_path / "run" / "last.pt")
    assert meta["student"]["mff"]["variant"] == variant
    val = datasets.load("sample", root, "val", modalities=meta["modalities"])
    flat = flat_metrics(evaluate(model, val, ("mss",), progress=False))
    assert 0 <= flat["mss"]["mIoU"] <= 100
    if variant == "author":
        with pytest.raises(PipelineError, match="se_features: decoder"):
            train(student, tiny(root, cache, tmp_path / "r2", steps=1,
                                loss={"se_features": "decoder"}), progress=False)


def test_distill_warmup_ramps_the_lscd_weights(sample_cache, tmp_path):
    """`train.loss.distill_warmup`: step s (0-based) of the ramp weighs L_cr and L_se by
    (s + 1) / (warmup * steps); L_sup keeps its weight. Read back from the logged terms."""
    root, cache = sample_cache
    out = tmp_path / "run"
    train(TINY_STUDENT, tiny(root, cache, out, steps=4, checkpoint_every=4,
                             loss={"distill_warmup": 0.5}), progress=False)
    run = logged(out)
    terms = {name: [float(v) for v in run[f"train/{name}"]["values"]]
             for name in ("loss", "L_sup", "L_cr", "L_se")}
    assert len(terms["loss"]) == 4
    for step, factor in enumerate((0.5, 1.0, 1.0, 1.0)):
        want = terms["L_sup"][step] + factor * (terms["L_cr"][step] + terms["L_se"][step])
        assert terms["loss"][step] == pytest.approx(want, rel=1e-5)
    assert terms["L_cr"][0] + terms["L_se"][0] > 1e-3  # the ramp has something to weigh


def test_se_target_identity_replaces_the_class_embeddings(sample_cache, tmp_path, monkeypatch):
    """`train.loss.se_target: identity` is the control for the language prior: L_se's target
    is the identity (prototypes kept apart), not E_C's structure; `teacher` reads E_C."""
    from stages.student import train as train_module
    from stages.student.losses import semantic

    seen = []

    def recording(fused, label, class_embeddings, *args, **kw):
        seen.append(class_embeddings.detach().clone())
        return semantic(fused, label, class_embeddings, *args, **kw)

    monkeypatch.setattr(train_module, "semantic", recording)
    root, cache = sample_cache
    for target in ("identity", "teacher"):
        train(TINY_STUDENT, tiny(root, cache, tmp_path / target, steps=1, checkpoint_every=1,
                                 loss={"se_target": target}), progress=False)
    identity, teacher = seen
    assert torch.equal(identity, torch.eye(25))
    assert teacher.shape[0] == 25 and not torch.equal(teacher, torch.eye(25))


@pytest.mark.parametrize("variant", ["author", "paper"])
def test_l_base_alone_trains_the_table5_baseline(sample_cache, tmp_path, variant):
    """Table 5's base row: only L_base (CE on the mean of the per-modality logits), on
    RGB-Depth; the logged loss is L_base, and the checkpoint knows its two modalities."""
    root, cache = sample_cache
    out = tmp_path / "run"
    student = StudentConfig(backbone=TINY_BACKBONE, embed_dim=16, mff={"variant": variant})
    train(student, tiny(root, cache, out, steps=2, checkpoint_every=2,
                        modalities=["rgb", "depth"],
                        loss={"w_base": 1.0, "w_sup": 0.0, "w_cr": 0.0, "w_se": 0.0}),
          progress=False)
    run = logged(out)
    base = [float(v) for v in run["train/L_base"]["values"]]
    loss = [float(v) for v in run["train/loss"]["values"]]
    assert len(base) == 2 and all(b > 0 for b in base)
    assert loss == pytest.approx(base)
    assert "train/L_cr" not in run and "train/L_se" not in run
    _, meta = load_checkpoint(out / "last.pt")
    assert meta["modalities"] == ["rgb", "depth"] and meta["train"]["loss"]["w_base"] == 1.0
