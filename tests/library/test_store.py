import json
import shutil

import numpy as np
import pytest

from any2seg.content import FileHashes, file_digest, from_read, sample_digest
from any2seg.errors import PipelineError
from any2seg.store import (
    CacheWriter,
    StoreDamage,
    StoreSpec,
    describe,
    mismatches,
    open_cache,
    plan,
    writer_lock,
)

IDS = [f"cloud/train/MAP_1_point0/{i:06d}" for i in range(10)]
FP = {"encoder": "languagebind", "checkpoints": {"image": {"weights": "abc"}},
      "class_prompt": "{}"}
ROW_ARRAYS = ("caption", "scene", "visual/rgb", "visual/depth", "input_hash")


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
    rows = list(writer.shard_rows(shard))
    n = len(rows)
    writer.write_rows(rows, [f"caption {r}" for r in rows], rng.normal(size=(n, 8)),
                      {m: rng.normal(size=(n, 8)) for m in writer.modalities},
                      [f"hash{r}" for r in rows])


def full(path):
    w = make(path)
    for shard in range(w.num_shards):
        fill(w, shard)
    return w


def test_schema_names_and_roundtrip(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path)
    assert w.num_shards == 3 and list(w.shard_rows(2)) == [8, 9]
    fill(w, 1)
    cache = open_cache(path)
    names = {"sample_id", "caption", "scene", "visual/rgb", "visual/depth", "classes",
             "class_names", "done", "input_hash"}
    for name in names:
        assert cache.group[name] is not None
    for key in ("schema_version", "teacher_fingerprint", "sample_list_fingerprint", "dim",
                "dtype", "checksum", "input_hash"):
        assert key in cache.attrs
    assert cache.attrs["schema_version"] == 2
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
    # every chunk, shard index included, carries a CRC32C
    codecs = cache.group["scene"].metadata.to_dict()["codecs"][0]["configuration"]["codecs"]
    assert [c["name"] for c in codecs][-1] == "crc32c"


def test_low_file_count(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path, spec(rows_per_shard=64))
    fill(w, 0)
    chunk_files = [p for p in path.rglob("*") if p.is_file() and "c" in p.relative_to(path).parts]
    # one file per array: sample_id, caption, input_hash, done, scene, 2 visual, classes,
    # class_names
    assert len(chunk_files) == 9


def test_refuses_other_teacher_dataset_dtype(tmp_path):
    path = tmp_path / "c.zarr"
    make(path)
    cache, problems = mismatches(path, spec())
    assert cache is not None and problems == []
    other = {**FP, "class_prompt": "a photo of a {}"}
    problems = mismatches(path, spec(teacher_fingerprint=other))[1]
    assert "another teacher: class_prompt" in problems[0]
    assert "another sample list" in mismatches(path, spec(ids=IDS[:9]))[1][0]
    assert "dtype float16" in mismatches(path, spec(dtype="float32"))[1][0]
    assert "modalities" in mismatches(path, spec(modalities=["rgb"]))[1][0]


def test_schema_1_store_is_named_and_never_read(tmp_path):
    """A store of the first schema has no checksums or input hashes: it is refused with
    the rebuild command, by readers and writers alike."""
    path = tmp_path / "c.zarr"
    full(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(PipelineError, match="cache schema 1; this version reads 2.*"
                                            "cannot be verified.*--overwrite"):
        open_cache(path)
    cache, problems = mismatches(path, spec())
    assert cache is None and "schema version 1" in problems[0]


def test_foreign_directory_is_never_touched(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "notes.txt").write_text("precious")
    with pytest.raises(PipelineError, match="not a teacher cache"):
        mismatches(path, spec())
    assert (path / "notes.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(PipelineError, match="--out is a file, not a folder.*store folder"):
        mismatches(tmp_path / "file", spec())
    with pytest.raises(PipelineError, match="--out is a file"):
        with writer_lock(tmp_path / "file"):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_interrupted_creation_is_recreated(tmp_path):
    path = tmp_path / "c.zarr"
    make(path)
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["state"] = "creating"
    (path / "zarr.json").write_text(json.dumps(meta))
    assert mismatches(path, spec()) == (None, [])
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


# -- damage: each kind is found, named by array and rows, never read as zeros ---------------
def shard_file(path, name, shard):
    return open_cache(path).shard_file(name, shard)


def flip_middle(f, count=1):
    data = bytearray(f.read_bytes())
    for i in range(count):
        data[len(data) // 3 + i] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "missing": (lambda f: f.unlink(), "missing file"),
    "zero-length": (lambda f: f.write_bytes(b""), "empty file"),
    "flipped byte": (flip_middle, "checksum mismatch"),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:-7]), "checksum mismatch"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
@pytest.mark.parametrize("array", ["visual/rgb", "caption", "done", "input_hash"])
def test_every_kind_of_damage_is_found(tmp_path, kind, array):
    path = tmp_path / "c.zarr"
    full(path)
    before = open_cache(path).get(IDS)
    damage, problem = DAMAGE[kind]
    damage(shard_file(path, array, 1))
    cache = open_cache(path)
    found = cache.verify()
    if array == "done" and kind in ("missing", "zero-length"):
        # rows without a done flag are simply not computed: recomputed by the next run,
        # never read as targets
        assert found == [] and cache.done.tolist() == [True] * 4 + [False] * 4 + [True] * 2
        with pytest.raises(PipelineError, match="4 of 10 rows are not computed"):
            cache.require(IDS)
        return
    assert [(d.array, d.rows) for d in found] == [(array, range(4, 8))]
    assert found[0].problem.startswith(problem)
    if array in ("visual/rgb",):
        with pytest.raises(StoreDamage) as err:
            cache.get(IDS[3:6])
        msg = str(err.value)
        assert "\n" not in msg and f"{array} rows 4-7" in msg and "--repair" in msg
        assert str(path) in msg
        # rows in other shards still read, and equal what was written
        np.testing.assert_array_equal(cache.get(IDS[:4])["visual"]["rgb"],
                                      before["visual"]["rgb"][:4])


def test_missing_vector_chunk_is_damage_not_zeros(tmp_path):
    """Finding 2: zarr reads a missing chunk as fill values; the store calls it damage."""
    path = tmp_path / "c.zarr"
    full(path)
    (path / "visual" / "rgb" / "c" / "2" / "0").unlink()
    import zarr

    raw = zarr.open_group(str(path), mode="r")["visual/rgb"][8:10]
    assert not raw.any()  # what an unchecked reader sees: zeros
    with pytest.raises(StoreDamage, match=r"visual/rgb rows 8-9 \(missing file "
                                          r"visual/rgb/c/2/0\)"):
        open_cache(path).get(IDS[8:])
    with pytest.raises(StoreDamage, match="visual/rgb rows 8-9"):
        describe(path)


def test_damaged_ids_and_classes_are_found(tmp_path):
    path = tmp_path / "c.zarr"
    full(path)
    flip_middle(path / "classes" / "c" / "0" / "0")
    (path / "sample_id" / "c" / "0").unlink()
    found = {(d.array, d.problem.split(" ")[0]) for d in open_cache(path).verify()}
    assert found == {("classes", "checksum"), ("sample_id", "missing")}
    with pytest.raises(StoreDamage, match="classes, all 3 classes"):
        _ = open_cache(path).classes


def test_chunks_of_fill_values_are_written(tmp_path):
    """zarr skips chunks equal to the fill value by default; a store must not, or an empty
    caption or a zero vector would be indistinguishable from a missing file."""
    path = tmp_path / "c.zarr"
    w = make(path)
    rows = list(w.shard_rows(0))
    zeros = np.zeros((4, 8))
    w.write_rows(rows, [""] * 4, zeros, {m: zeros for m in w.modalities}, ["h"] * 4)
    cache = open_cache(path)
    assert cache.verify() == []
    assert cache.captions(IDS[:4]) == [""] * 4
    assert not cache.get(IDS[:4])["scene"].any()


def test_plan_names_new_changed_and_damaged_rows(tmp_path):
    path = tmp_path / "c.zarr"
    w = make(path)
    fill(w, 0)
    fill(w, 1)
    hashes = [f"hash{r}" for r in range(10)]
    hashes[5] = "edited"
    todo = plan(open_cache(path), hashes, repair=False)
    assert todo.new == [8, 9] and todo.changed == [5] and todo.damaged == []
    (path / "scene" / "c" / "0" / "0").write_bytes(b"")
    with pytest.raises(StoreDamage, match="scene rows 0-3"):
        plan(open_cache(path), hashes, repair=False)
    todo = plan(open_cache(path), hashes, repair=True)
    assert todo.damaged == [0, 1, 2, 3] and todo.changed == [5] and todo.new == [8, 9]


def test_writing_a_subset_of_rows_leaves_the_others_byte_identical(tmp_path):
    path = tmp_path / "c.zarr"
    w = full(path)
    before = {n: open_cache(path).read(n) for n in ROW_ARRAYS}
    w.write_rows([5], ["new caption"], np.ones((1, 8)), {m: np.ones((1, 8))
                                                         for m in w.modalities}, ["h5"])
    after = open_cache(path)
    for n in ROW_ARRAYS:
        got = after.read(n)
        keep = [r for r in range(10) if r != 5]
        np.testing.assert_array_equal(got[keep], before[n][keep], err_msg=n)
    assert after.captions([IDS[5]]) == ["new caption"]
    assert after.read("input_hash")[5] == "h5"


# -- input hashes --------------------------------------------------------------------------
def test_input_hashes_are_of_file_bytes_and_remembered(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    import hashlib

    assert file_digest(a) == hashlib.sha256(b"one").hexdigest()
    expected = hashlib.sha256(
        f"label\t{hashlib.sha256(b'two').hexdigest()}\n"
        f"rgb\t{hashlib.sha256(b'one').hexdigest()}\n".encode()).hexdigest()[:32]
    assert sample_digest({"rgb": file_digest(a), "label": file_digest(b)}) == expected
    # a copy of the same bytes elsewhere gives the same sample digest
    c = tmp_path / "copy" / "a.png"
    c.parent.mkdir()
    c.write_bytes(b"one")
    memo = tmp_path / "hashes.json"
    hashes = FileHashes(memo)
    first = hashes.sample_digests([{"rgb": a, "label": b}, {"rgb": c, "label": b}])
    assert first[0] == first[1] == expected and hashes.hashed == 3
    assert hashes.save()
    again = FileHashes(memo)
    assert again.sample_digests([{"rgb": a, "label": b}]) == [expected] and again.hashed == 0
    a.write_bytes(b"ONE")  # an edit in place: new size or mtime, new digest
    edited = FileHashes(memo).sample_digests([{"rgb": a, "label": b}])
    assert edited != [expected]
    with pytest.raises(PipelineError, match="cannot read .*gone.png"):
        FileHashes(memo).sample_digests([{"rgb": tmp_path / "gone.png"}])


def test_hashes_from_a_decoding_read_equal_the_hash_pass(tmp_path):
    """`lookup` reads nothing; digests learned from the decoding read (or, for a file the
    decoder did not record, hashed by `from_read`) give the hash pass's sample digests."""
    files = []
    for i in range(3):
        f = {}
        for kind in ("rgb", "label"):
            f[kind] = tmp_path / f"{kind}{i}.png"
            f[kind].write_bytes(f"{kind} {i}".encode())
        files.append(f)
    expected = FileHashes(None).sample_digests(files)
    memo = tmp_path / "hashes.json"
    hashes = FileHashes(memo)
    assert hashes.lookup(files) == [None, None, None] and hashes.hashed == 0
    read = {str(f["rgb"]): file_digest(f["rgb"]) for f in files}  # the decoder read rgb only
    got = []
    for f in files:
        digest, extra = from_read(f, read)
        assert extra == {str(f["label"]): file_digest(f["label"])}
        hashes.learn({**read, **extra})
        got.append(digest)
    assert got == expected and hashes.hashed == 6 and hashes.save()
    again = FileHashes(memo)
    assert again.lookup(files) == expected and again.hashed == 0
    # a done row's unknown files are read by `complete`; remembered ones are not
    files[1]["rgb"].write_bytes(b"edited")
    hashes = FileHashes(memo)
    partial = hashes.lookup(files)
    assert partial[0] == expected[0] and partial[1] is None
    hashes.complete(files, partial, [1])
    assert partial == FileHashes(None).sample_digests(files) and hashes.hashed == 1
