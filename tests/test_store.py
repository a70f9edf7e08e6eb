import json

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.store import CacheWriter, StoreSpec, describe, open_cache, writer_lock

IDS = [f"cloud/train/MAP_1_point0/{i:06d}" for i in range(10)]
FP = {"encoder": "languagebind", "checkpoints": {"image": {"weights": "abc"}},
      "class_prompt": "{}"}


def spec(**kw):
    base = dict(ids=IDS, modalities=["rgb", "depth"], teacher_fingerprint=FP,
                dtype="float16", rows_per_shard=4)
    return StoreSpec(**{**base, **kw})


def make(path, s=None):
    s = s or spec()
    classes = np.eye(3, 8, dtype=np.float32)
    return CacheWriter.create(path, s, 8, ["road", "sky", "car"], classes)


def fill(writer, shard, seed=0):
    rng = np.random.default_rng(seed + shard)
    n = len(writer.shard_rows(shard))
    writer.write_shard(shard, [f"caption {r}" for r in writer.shard_rows(shard)],
                       rng.normal(size=(n, 8)), {m: rng.normal(size=(n, 8))
                                                 for m in writer.modalities})


def test_schema_names_and_roundtrip(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path)
    assert w.num_shards == 3 and list(w.shard_rows(2)) == [8, 9]
    assert w.pending_shards() == [0, 1, 2]
    fill(w, 1)
    assert w.pending_shards() == [0, 2]
    cache = open_cache(path)
    names = {"sample_id", "caption", "scene", "visual/rgb", "visual/depth", "classes",
             "class_names", "done"}
    for name in names:
        assert cache.group[name] is not None
    for key in ("schema_version", "teacher_fingerprint", "dataset_fingerprint", "dim", "dtype"):
        assert key in cache.attrs
    assert cache.ids == IDS and cache.class_names == ["road", "sky", "car"]
    assert cache.group["scene"].dtype == np.float16 and cache.dim == 8
    np.testing.assert_array_equal(cache.classes, np.eye(3, 8))
    assert cache.done.tolist() == [False] * 4 + [True] * 4 + [False] * 2
    got = cache.get(IDS[5:7])
    rng = np.random.default_rng(1)
    scene = rng.normal(size=(4, 8)).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got["scene"], scene[1:3])
    assert set(got["visual"]) == {"rgb", "depth"}
    assert cache.captions(IDS[4:6]) == ["caption 4", "caption 5"]
    assert cache.scene.shape == (10, 8)  # lazy dask array
    with pytest.raises(PipelineError, match="not computed"):
        cache.require(IDS[:5])
    cache.require(IDS[4:8])
    with pytest.raises(PipelineError, match="no rows for 1 samples"):
        cache.get(["fog/val/x/000000"])


def test_low_file_count(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path, spec(rows_per_shard=64))
    fill(w, 0)
    chunk_files = [p for p in path.rglob("*") if p.is_file() and "c" in p.relative_to(path).parts]
    # one file per array: sample_id, caption, done, scene, 2 visual, classes, class_names
    assert len(chunk_files) == 8


def test_refuses_other_teacher_dataset_dtype(tmp_path):
    path = tmp_path / "c.zarr"
    make(path)
    assert CacheWriter.check(path, spec()) is not None
    other = {**FP, "class_prompt": "a photo of a {}"}
    with pytest.raises(PipelineError, match="another teacher: class_prompt"):
        CacheWriter.check(path, spec(teacher_fingerprint=other))
    with pytest.raises(PipelineError, match="another sample list"):
        CacheWriter.check(path, spec(ids=IDS[:9]))
    with pytest.raises(PipelineError, match="dtype float16"):
        CacheWriter.check(path, spec(dtype="float32"))
    with pytest.raises(PipelineError, match="--overwrite"):
        CacheWriter.check(path, spec(modalities=["rgb"]))
    # with overwrite the caller gets None (= create anew)
    assert CacheWriter.check(path, spec(ids=IDS[:9]), overwrite=True) is None


def test_foreign_directory_is_never_touched(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(PipelineError, match="not a teacher cache"):
            CacheWriter.check(path, spec(), overwrite=overwrite)
    assert (path / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PipelineError, match="not a directory"):
        CacheWriter.check(tmp_path / "file", spec())


def test_interrupted_creation_is_recreated(tmp_path):
    path = tmp_path / "c.zarr"
    make(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["state"] = "creating"
    (path / "zarr.json").write_text(json.dumps(meta))
    assert CacheWriter.check(path, spec()) is None
    with pytest.raises(PipelineError, match="not fully created"):
        open_cache(path)


def test_second_writer_is_refused(tmp_path):
    path = tmp_path / "c.zarr"
    with writer_lock(path):
        with pytest.raises(PipelineError, match="being written by pid"):
            with writer_lock(path):
                pass
    with writer_lock(path):  # released after the first run
        pass


def test_reader_validation(tmp_path):
    with pytest.raises(PipelineError, match="not a teacher cache"):
        open_cache(tmp_path)
    path = tmp_path / "c.zarr"
    make(path)
    import shutil

    shutil.rmtree(path / "visual" / "depth")
    with pytest.raises(PipelineError, match="lacks the array visual/depth"):
        open_cache(path)


def test_describe(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path)
    fill(w, 0)
    info = describe(path)
    assert info["rows"] == 10 and info["done"] == 4 and info["done_fraction"] == 0.4
    assert info["dim"] == 8 and info["dtype"] == "float16" and info["classes"] == 3
    assert info["captions"] == {IDS[0]: "caption 0", IDS[1]: "caption 1", IDS[2]: "caption 2"}
    assert info["size_bytes"] > 0 and info["teacher_fingerprint"] == FP
