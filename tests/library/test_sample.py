import hashlib
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from any2seg import datasets
from any2seg.datasets.deliver import CASES, CONDITIONS
from any2seg.errors import PipelineError
from any2seg.synth import (
    SampleSpec,
    albedo,
    apply_weather,
    camera,
    events,
    lidar,
    make_sample,
    make_scene,
    render,
)

TINY = SampleSpec(size=64, train=6, val=2, test=2, frames_per_scene=2, seed=11)


def tree_digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_gives_same_bytes_whatever_the_workers(tmp_path):
    a = make_sample(tmp_path / "a", TINY, workers=1)
    b = make_sample(tmp_path / "b", TINY, workers=2)
    assert a["status"] == b["status"] == "written"
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    make_sample(tmp_path / "c", SampleSpec(**{**TINY.__dict__, "seed": 12}), workers=1)
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def test_layout_counts_and_classes(small_sample):
    root, spec = small_sample
    info = datasets.info("sample", root)
    assert {k: v["samples"] for k, v in info["splits"].items()} == {
        "train": spec.train, "val": spec.val, "test": spec.test}
    train = info["splits"]["train"]
    assert all(train["conditions"][c] > 0 for c in CONDITIONS)
    assert all(train["cases"][c] > 0 for c in ("none", *CASES))
    for split in ("val", "test"):
        assert sum(v > 0 for v in info["splits"][split]["conditions"].values()) == 5
    for top in ("img", "hha", "depth", "event", "lidar", "semantic"):
        assert (root / top).is_dir()
    present = set()
    for s in datasets.load("sample", root, "train,val,test", modalities=["rgb"]):
        present |= set(np.unique(s.label).tolist())
    assert 255 not in present
    assert len(present) >= 8


def _frames(root, case=None, condition=None, split="train,val,test"):
    return list(datasets.load("sample", root, split, case=case, condition=condition))


def test_files_have_the_expected_formats(small_sample):
    root, spec = small_sample
    s = datasets.load("sample", root, "train", modalities=["depth"], depth_source="raw")[0]
    with Image.open(s.files["depth"]) as im:
        raw = np.asarray(im)
    assert raw.dtype == np.uint16 and raw.ndim == 2
    assert raw.max() == 65535  # sky saturates
    s = datasets.load("sample", root, "train")[0]
    with Image.open(s.files["lidar"]) as im:
        assert im.mode == "L"
    lidar = s.modalities["lidar"][:, :, 0]
    assert 0.005 < (lidar > 0).mean() < 0.3  # sparse scan lines
    for sample in _frames(root, case="eventlowres"):
        with Image.open(sample.files["event"]) as im:
            assert im.size == (spec.size // 2, spec.size // 2)
        assert sample.modalities["event"].shape == (spec.size, spec.size, 3)


def _view(condition="sun", case=None, seed=5, size=96):
    """One rendered street, so weather and failures are compared on the same scene."""
    rng = np.random.default_rng(seed)
    scene = make_scene(rng, condition, case, 2)
    frame = render(scene, 1, size)
    return scene, frame


def _rgb(condition, case=None):
    scene, frame = _view(condition, case)
    radiance = apply_weather(scene, *albedo(scene, frame), frame.z)
    return camera(scene, radiance, np.random.default_rng(0)).astype(np.float32), frame


def test_night_is_dark_and_noisy():
    night, _ = _rgb("night")
    sun, _ = _rgb("sun")
    assert night.mean() < 0.35 * sun.mean()


def test_fog_contrast_falls_with_depth():
    def far_to_near(condition):
        img, frame = _rgb(condition)
        air = img[frame.z >= 1e4].mean(axis=0)
        dev = np.abs(img - air).mean(axis=2)
        return dev[(frame.z > 25) & (frame.z < 1e3)].mean() / dev[frame.z < 8].mean()

    assert far_to_near("fog") < 0.5 * far_to_near("sun")


def test_rgb_failures():
    clean, _ = _rgb("cloud")
    over, _ = _rgb("cloud", "overexposure")
    under, _ = _rgb("cloud", "underexposure")
    blur, _ = _rgb("cloud", "motionblur")
    assert over.mean() > 1.3 * clean.mean()
    assert under.mean() < 0.4 * clean.mean()

    def dx_over_dy(img):
        g = img.mean(axis=2)
        return np.abs(np.diff(g, axis=1)).mean() / np.abs(np.diff(g, axis=0)).mean()

    assert dx_over_dy(blur) < 0.7 * dx_over_dy(clean)


def test_lidar_scan_lines_jitter_and_fog_range():
    scene, frame = _view("cloud")
    clean = lidar(scene, frame.z, np.random.default_rng(0))
    jitter = lidar(replace(scene, case="lidarjitter"), frame.z, np.random.default_rng(0))
    fog = lidar(replace(scene, condition="fog"), frame.z, np.random.default_rng(0))
    rows = lambda a: int(((a > 0).sum(axis=1) > 0).sum())  # noqa: E731
    assert rows(jitter) > 1.3 * rows(clean)
    assert (fog > 0).sum() < (clean > 0).sum()
    assert fog[fog > 0].min() >= clean[clean > 0].min()  # no far returns in fog


def test_events_mark_moving_edges():
    scene, _ = _view("sun")
    frames = [render(scene, t, 96) for t in (1, 2)]
    rad = [apply_weather(scene, *albedo(scene, f), f.z) for f in frames]
    ev = events(rad[0], rad[1], scene, np.random.default_rng(0))
    active = ev.max(axis=2) > 0
    edges = np.zeros_like(active)
    edges[:, 1:] |= frames[1].cls[:, 1:] != frames[1].cls[:, :-1]
    edges[1:] |= frames[1].cls[1:] != frames[1].cls[:-1]
    assert active[edges].mean() > 2 * active[~edges].mean()
    still = events(rad[1], rad[1], scene, np.random.default_rng(0)).max(axis=2) > 0
    assert still.mean() < 0.01 < 0.05 < active.mean()  # only sensor noise without motion
    low = events(rad[0], rad[1], replace(scene, case="eventlowres"), np.random.default_rng(0))
    assert low.shape == (48, 48, 3)


def _pixels(root, split, modalities):
    xs, ys = [], []
    for s in datasets.load("sample", root, split, modalities=modalities):
        xs.append(np.concatenate([s.modalities[m].reshape(-1, 3) for m in modalities], 1))
        ys.append(s.label.ravel())
    return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)


def _nearest_centroid_accuracy(root, modalities):
    x, y = _pixels(root, "train", modalities)
    classes = np.unique(y)
    centroids = np.stack([x[y == c].mean(axis=0) for c in classes])
    xv, yv = _pixels(root, "val", modalities)
    d = ((xv[:, None, :] - centroids[None]) ** 2).sum(-1)
    pred = classes[d.argmin(1)]
    per_class = [np.mean(pred[yv == c] == c) for c in np.unique(yv)]
    return float(np.mean(per_class))


def test_learnable_and_modality_complementary(small_sample):
    """Even a per-pixel nearest-centroid classifier beats chance by far, and geometry
    (HHA) adds to appearance (RGB)."""
    root, _ = small_sample
    rgb = _nearest_centroid_accuracy(root, ["rgb"])
    both = _nearest_centroid_accuracy(root, ["rgb", "depth"])
    assert rgb > 3.0 / 20
    assert both > rgb + 0.05


def test_existing_foreign_folder_is_never_touched(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(PipelineError, match="not a generated sample"):
            make_sample(out, TINY, workers=1, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_rerun_is_noop_and_other_settings_need_overwrite(tmp_path):
    out = tmp_path / "s"
    make_sample(out, TINY, workers=1)
    before = tree_digest(out)
    assert make_sample(out, TINY, workers=1)["status"] == "up-to-date"
    other = SampleSpec(**{**TINY.__dict__, "train": 4})
    with pytest.raises(PipelineError, match="--overwrite"):
        make_sample(out, other, workers=1)
    assert tree_digest(out) == before
    (out / "keep.txt").write_text("user file")
    result = make_sample(out, other, workers=1, overwrite=True)
    assert result["status"] == "written"
    assert datasets.info("sample", out)["splits"]["train"]["samples"] == 4
    assert (out / "keep.txt").read_text() == "user file"


@pytest.mark.parametrize("bad", [{"size": 30}, {"size": 65}, {"train": -1},
                                 {"train": 0, "val": 0, "test": 0}, {"frames_per_scene": 0}])
def test_invalid_spec(tmp_path, bad):
    with pytest.raises(PipelineError):
        make_sample(tmp_path / "x", SampleSpec(**{**TINY.__dict__, **bad}), workers=1)
    assert not (tmp_path / "x").exists()


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path):
    stale = tmp_path / ".s.tmp-999999999"
    (stale / "img").mkdir(parents=True)
    make_sample(tmp_path / "s", TINY, workers=1)
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
