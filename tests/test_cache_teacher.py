import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pipeline.datasets import Sample
from pipeline.errors import PipelineError
from pipeline.store import open_cache
from stages.teacher import captioners
from stages.teacher.run import TeacherConfig, cache_teacher, model_input

ARRAYS = ("sample_id", "caption", "done", "scene", "classes", "class_names", "visual/rgb",
          "visual/depth", "visual/event", "visual/lidar")


def config(root, out, **kw):
    return TeacherConfig(dataset="sample", root=str(root), out=str(out),
                         teacher_root=str(root / "teacher"), **kw)


def assert_same_store(a, b):
    ca, cb = open_cache(a), open_cache(b)
    for name in ARRAYS:
        np.testing.assert_array_equal(ca.group[name][:], cb.group[name][:], err_msg=name)


def test_builds_a_complete_store_then_reruns_without_a_model(teacher_sample, tmp_path,
                                                             monkeypatch):
    root, spec = teacher_sample
    out = tmp_path / "c.zarr"
    report = cache_teacher(config(root, out, rows_per_shard=16))
    n = spec.train + spec.val + spec.test
    assert report.status == "written" and report.computed_rows == n
    cache = open_cache(out)
    assert len(cache) == n and cache.done.all()
    from pipeline import datasets

    assert cache.ids == datasets.load("sample", root, "train,val,test").ids
    assert cache.modalities == ["rgb", "depth", "event", "lidar"]
    assert len(cache.class_names) == 25 and cache.classes.shape == (25, 64)
    got = cache.get(cache.ids[:5])
    np.testing.assert_allclose(np.linalg.norm(got["scene"], axis=1), 1.0, atol=2e-3)
    for m in cache.modalities:
        np.testing.assert_allclose(np.linalg.norm(got["visual"][m], axis=1), 1.0, atol=2e-3)
    assert not np.allclose(got["visual"]["rgb"], got["visual"]["depth"])
    caption = cache.captions(cache.ids[:1])[0]
    assert caption.startswith("a cloudy street with ") and "road" in caption

    def no_model(*args, **kwargs):
        raise AssertionError("a complete store must not load the teacher")

    monkeypatch.setattr("stages.teacher.languagebind.LanguageBind.__init__", no_model)
    start = time.perf_counter()
    again = cache_teacher(config(root, out, rows_per_shard=16))
    assert again.status == "complete" and again.computed_rows == 0
    assert time.perf_counter() - start < 3.0


def test_other_teacher_settings_are_refused_then_overwritten(teacher_sample, tmp_path):
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    cache_teacher(config(root, out, split=["val"], rows_per_shard=8))
    before = open_cache(out).group["visual/depth"][:]
    with pytest.raises(PipelineError, match="another teacher: checkpoints.depth .set in the "
                                            "store, absent now.; modality_branch.depth"):
        cache_teacher(config(root, out, split=["val"], modality_branch={"depth": "image"}))
    with pytest.raises(PipelineError, match="another sample list"):
        cache_teacher(config(root, out, split=["test"]))
    with pytest.raises(PipelineError, match="class_prompt"):
        cache_teacher(config(root, out, split=["val"], class_prompt="a photo of {}"))
    cache_teacher(config(root, out, split=["val"], modality_branch={"depth": "image"},
                         overwrite=True))
    after = open_cache(out)
    assert after.teacher_fingerprint["modality_branch"]["depth"] == "image"
    assert not np.array_equal(before, after.group["visual/depth"][:])


def test_resume_after_sigkill_gives_identical_arrays(teacher_sample, tmp_path):
    root, _ = teacher_sample
    killed, reference = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    args = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--dataset", "sample",
            "--root", str(root), "--teacher-root", str(root / "teacher"), "--out", str(killed),
            "--rows-per-shard", "2", "--batch-size", "1", "--decode-workers", "1",
            "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_dir = killed / "done" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.is_dir() and any(done_dir.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_cache(killed).done
    assert 0 < partial.sum() < partial.size, "the kill must land mid-run"
    cache_teacher(config(root, killed, rows_per_shard=2, batch_size=1))
    cache_teacher(config(root, reference, rows_per_shard=2, batch_size=1))
    assert open_cache(killed).done.all()
    assert_same_store(killed, reference)
    assert not list(killed.rglob("*.partial"))


@pytest.mark.slow
def test_local_dask_cluster_equals_single_process(teacher_sample, tmp_path):
    root, _ = teacher_sample
    single, dist = tmp_path / "single.zarr", tmp_path / "dist.zarr"
    before = dict(os.environ)
    cache_teacher(config(root, single, split=["val"], rows_per_shard=4))
    report = cache_teacher(config(root, dist, split=["val"], rows_per_shard=4,
                                  scheduler="local:2"))
    assert report.extra["workers"] == 2 and report.computed_rows == 12
    assert_same_store(single, dist)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the parent's environment is restored
        assert os.environ.get(var) == before.get(var)


def test_captioner_registry_is_drop_in(teacher_sample, tmp_path):
    root, _ = teacher_sample

    @captioners.register
    class Shouting(captioners.Captioner):
        name = "test-shouting"

        def caption(self, samples):
            return [f"{s.condition.upper()} SCENE {s.id}" for s in samples]

    out = tmp_path / "c.zarr"
    cache_teacher(config(root, out, split=["val"], captioner="test-shouting"))
    cache = open_cache(out)
    assert cache.captions(cache.ids[:1]) == [f"CLOUD SCENE {cache.ids[0]}"]
    assert cache.teacher_fingerprint["captioner"] == {"name": "test-shouting"}
    with pytest.raises(PipelineError, match="unknown captioner 'nope'.*template"):
        cache_teacher(config(root, tmp_path / "x.zarr", captioner="nope"))


def test_depth_branch_needs_metric_depth():
    sample = Sample(id="x", modalities={"depth": np.zeros((4, 4, 3), np.uint8)},
                    label=np.zeros((4, 4), np.int64))
    with pytest.raises(PipelineError, match="16-bit metric depth.*--modality-branch"):
        model_input(sample, "depth", "depth")
    assert model_input(sample, "depth", "image").shape == (4, 4, 3)


def test_bad_configuration_is_refused(teacher_sample, tmp_path):
    root, _ = teacher_sample
    with pytest.raises(PipelineError, match="branch 'sonar'"):
        cache_teacher(config(root, tmp_path / "a.zarr", modality_branch={"lidar": "sonar"}))
    # params.yaml may map other datasets' modalities (ignored here); a typo is refused
    assert "nir" not in config(root, tmp_path / "a.zarr",
                               modality_branch={"nir": "image"}).branch_map()
    with pytest.raises(PipelineError, match="names 'nri', which no registered dataset has"):
        cache_teacher(config(root, tmp_path / "a.zarr", modality_branch={"nri": "image"}))
    with pytest.raises(PipelineError, match="no LanguageBind_Depth"):
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(tmp_path / "b"),
                                    teacher_root=str(tmp_path)))
    with pytest.raises(PipelineError, match=r"params.yaml: teacher: unknown key 'batchsize'"):
        TeacherConfig.from_params({"teacher": {"batchsize": 4}}, {})
    with pytest.raises(PipelineError, match="teacher.batch_size must be an integer"):
        TeacherConfig.from_params({"teacher": {"batch_size": "four"}}, {})
    with pytest.raises(PipelineError, match="class_prompt must be a text with {}"):
        TeacherConfig.from_params({}, {"class_prompt": "a photo"})


def test_cli_cache_teacher_and_cache_info(teacher_sample, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    root, _ = teacher_sample
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        f"dataset: {{name: sample, root: {root}}}\n"
        f"teacher: {{root: {root / 'teacher'}, rows_per_shard: 8}}\n")

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        return exit_info.value.code, *capsys.readouterr()

    code, out, err = run("cache-teacher", "--split", "val", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["computed_rows"] == 12 and report["out"] == "cache/sample.zarr"
    code, out, _ = run("cache-teacher", "--split", "val")
    assert code == 0 and "complete (12 rows); nothing to do" in out
    code, out, _ = run("cache-info", "cache/sample.zarr", "--json")
    info = json.loads(out)
    assert info["rows"] == 12 and info["done_fraction"] == 1.0 and info["rows_per_shard"] == 8
    assert len(info["captions"]) == 3
    code, out, _ = run("cache-info", "cache/sample.zarr")
    assert code == 0 and "12/12 rows done" in out and "teacher fingerprint" in out
    code, _, err = run("cache-teacher", "--split", "val", "--modality-branch", "lidar")
    assert code == 2 and "NAME=VALUE" in err and err.count("\n") == 1
    code, _, err = run("cache-info", "nowhere.zarr")
    assert code == 1 and "not a teacher cache" in err
