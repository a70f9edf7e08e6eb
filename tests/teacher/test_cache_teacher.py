import json
import os
import shutil
import sys
import time

import numpy as np
import pytest

from any2seg.datasets import Sample
from any2seg.errors import PipelineError
from any2seg.store import open_cache
from stages.teacher import captioners
from stages.teacher.run import TeacherConfig, cache_teacher, model_input, teacher_fingerprint
from tests.killing import kill_after_first_rows

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ARRAYS = ("sample_id", "caption", "done", "scene", "classes", "class_names", "visual/rgb",
          "visual/depth", "visual/event", "visual/lidar", "input_hash")


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
    from any2seg import datasets

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
    # --on-mismatch rebuild (the DVC stage's choice): back to the first teacher, no refusal
    report = cache_teacher(config(root, out, split=["val"], rows_per_shard=8,
                                  on_mismatch="rebuild"))
    assert report.status == "written" and report.computed_rows == len(before)
    np.testing.assert_array_equal(open_cache(out).group["visual/depth"][:], before)


def test_resume_after_sigkill_gives_identical_arrays(teacher_sample, tmp_path, monkeypatch):
    """The val split (12 rows, 6 shards of 2): the resume and the reference build compute
    a quarter of the sample's rows, and the kill still lands after the first shard. The
    killed process computes with one thread, as this one."""
    root, _ = teacher_sample
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    killed, reference = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    args = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--dataset", "sample",
            "--root", str(root), "--teacher-root", str(root / "teacher"), "--out", str(killed),
            "--split", "val", "--rows-per-shard", "2", "--batch-size", "1",
            "--decode-workers", "1", "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    kill_after_first_rows(args, killed, timeout=120)
    partial = open_cache(killed).done
    assert 0 < partial.sum() < partial.size, "the kill must land mid-run"
    kw = dict(split=["val"], rows_per_shard=2, batch_size=1)
    cache_teacher(config(root, killed, **kw))
    cache_teacher(config(root, reference, **kw))
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
    with pytest.raises(PipelineError, match="no LanguageBind_Image"):  # auto: all to image
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(tmp_path / "b"),
                                    teacher_root=str(tmp_path)))
    with pytest.raises(PipelineError, match="no LanguageBind_Depth"):  # named: must exist
        cache_teacher(TeacherConfig(dataset="sample", root=str(root), out=str(tmp_path / "b"),
                                    teacher_root=str(tmp_path), modality_branch={"depth":
                                                                                 "depth"}))
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
    # the model's time splits into computing and waiting for the decode pool
    assert report["decode_workers"] >= 4 and 0 < report["model_waited"] < 1
    assert report["model_busy"] + report["model_waited"] <= 1
    code, out, _ = run("cache-teacher", "--split", "val")
    assert code == 0 and "complete (12 rows, inputs unchanged); nothing to do" in out
    code, out, _ = run("cache-info", "cache/sample.zarr", "--json")
    info = json.loads(out)
    assert info["rows"] == 12 and info["done_fraction"] == 1.0 and info["rows_per_shard"] == 8
    assert len(info["captions"]) == 3
    code, out, _ = run("cache-info", "cache/sample.zarr")
    assert code == 0 and "12/12 rows done" in out and "teacher fingerprint" in out
    assert f"last run: 12 rows, model busy {100 * report['model_busy']:.0f}%" in out
    assert f"the model waited {100 * report['model_waited']:.0f}% of the loop" in out
    code, _, err = run("cache-teacher", "--split", "val", "--modality-branch", "lidar")
    assert code == 2 and "NAME=VALUE" in err and err.count("\n") == 1
    code, _, err = run("cache-info", "nowhere.zarr")
    assert code == 1 and "not a teacher cache" in err


# -- content-aware reruns, damage and repair ---------------------------------------------------
def edit_image(path):
    from PIL import Image

    pixels = np.array(Image.open(path))
    pixels[: pixels.shape[0] // 2] = 255 - pixels[: pixels.shape[0] // 2]
    Image.fromarray(pixels).save(path)


def test_an_edited_image_recomputes_exactly_its_row(own_sample, tmp_path):
    """Finding 1: an image edited in place (same name) left its row stale ("nothing to do",
    even with --overwrite). Now the rerun recomputes that row only, equal to a clean build."""
    from any2seg import datasets

    kw = dict(split=["val"], rows_per_shard=4, batch_size=2)
    out = tmp_path / "c.zarr"
    cache_teacher(config(own_sample, out, **kw))
    before = {name: open_cache(out).group[name][:] for name in ARRAYS}
    fp_before = open_cache(out).dataset_fingerprint
    edited = datasets.load("sample", own_sample, "val")[5]
    edit_image(edited.files["rgb"])

    report = cache_teacher(config(own_sample, out, **kw))
    assert report.status == "written" and report.computed_rows == 1
    assert report.changed_rows == 1 and report.new_rows == 0 and report.hashed_files == 1
    after = open_cache(out)
    assert after.dataset_fingerprint != fp_before
    rgb = after.group["visual/rgb"][:]
    assert np.abs(rgb[5].astype(np.float32) - before["visual/rgb"][5]).max() > 0.01
    for name in ARRAYS:  # every other row is byte-identical
        keep = [i for i in range(len(before[name])) if name in ("classes", "class_names")
                or i != 5]
        np.testing.assert_array_equal(after.group[name][:][keep], before[name][keep],
                                      err_msg=name)
    clean = tmp_path / "clean.zarr"
    cache_teacher(config(own_sample, clean, **kw))
    assert_same_store(out, clean)
    # unchanged now; --overwrite still rebuilds every row
    assert cache_teacher(config(own_sample, out, **kw)).status == "complete"
    rebuilt = cache_teacher(config(own_sample, out, overwrite=True, **kw))
    assert rebuilt.status == "written" and rebuilt.computed_rows == 12
    assert_same_store(out, clean)


def damage_store(path):
    """One of each kind of damage, in four different shards."""
    (path / "visual" / "rgb" / "c" / "2" / "0").unlink()
    (path / "scene" / "c" / "1" / "0").write_bytes(b"")
    f = path / "visual" / "depth" / "c" / "0" / "0"
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))
    f = path / "caption" / "c" / "3"
    f.write_bytes(f.read_bytes()[:-5])
    f = path / "classes" / "c" / "0" / "0"
    f.write_bytes(f.read_bytes()[:-3])


def test_damage_is_refused_then_repaired_to_a_clean_store(own_sample, tmp_path, capsys):
    from pipeline.cli import main

    kw = dict(split=["val"], rows_per_shard=3, batch_size=2)
    out, clean = tmp_path / "c.zarr", tmp_path / "clean.zarr"
    cache_teacher(config(own_sample, clean, **kw))
    shutil.copytree(clean, out)
    damage_store(out)

    def cli(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        return exit_info.value.code, *capsys.readouterr()

    code, printed, err = cli("cache-verify", str(out))
    assert code == 1
    for where in ("visual/rgb rows 6-8 (missing file", "scene rows 3-5 (empty file",
                  "visual/depth rows 0-2 (checksum mismatch)", "caption rows 9-11 (checksum",
                  "classes, all 25 classes (checksum"):
        assert where in printed, where
    ids = open_cache(clean).ids
    assert all(i in printed for i in ids[6:9])
    assert "--repair" in printed.splitlines()[-1]
    for args in (["cache-info", str(out)],
                 ["cache-teacher", "--dataset", "sample", "--root", str(own_sample),
                  "--teacher-root", str(own_sample / "teacher"), "--split", "val",
                  "--rows-per-shard", "3", "--out", str(out), "--params",
                  str(tmp_path / "none.yaml")]):
        (tmp_path / "none.yaml").write_text("{}\n")
        code, _, err = cli(*args)
        assert code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{out} is damaged: classes, all 25 classes (checksum mismatch); " in err
        assert "; and 2 more; " in err and "--repair" in err

    report = cache_teacher(config(own_sample, out, repair=True, **kw))
    assert report.repaired_rows == 12 and report.computed_rows == 12
    assert_same_store(out, clean)
    assert open_cache(out).verify() == []
    chunks = sorted(p.relative_to(clean) for p in clean.rglob("*")
                    if p.is_file() and "c" in p.relative_to(clean).parts)
    assert chunks == sorted(p.relative_to(out) for p in out.rglob("*")
                            if p.is_file() and "c" in p.relative_to(out).parts)
    for rel in chunks:  # every chunk file is byte-identical to the clean build's
        assert (out / rel).read_bytes() == (clean / rel).read_bytes(), rel


def test_repair_recomputes_only_the_damaged_rows(own_sample, tmp_path):
    kw = dict(split=["val"], rows_per_shard=4, batch_size=2)
    out = tmp_path / "c.zarr"
    cache_teacher(config(own_sample, out, **kw))
    good = {p: p.read_bytes() for p in (out / "visual" / "rgb" / "c").rglob("*")
            if p.is_file()}
    (out / "visual" / "rgb" / "c" / "1" / "0").unlink()
    report = cache_teacher(config(own_sample, out, repair=True, **kw))
    assert (report.repaired_rows, report.computed_rows, report.shards) == (4, 4, 1)
    for p, data in good.items():
        assert p.read_bytes() == data, p
    assert cache_teacher(config(own_sample, out, **kw)).status == "complete"


def test_a_first_run_reads_each_input_file_once(teacher_sample, tmp_path, monkeypatch):
    """The input hashes come from the read that decodes each file (there was a separate
    hashing pass before), and equal that pass's: row hashes and remembered digests."""
    import builtins
    import io
    from collections import Counter

    from any2seg.content import FileHashes, file_digest
    from stages.teacher.run import load_samples

    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    cfg = config(root, out, split=["val"], rows_per_shard=4, batch_size=3)
    files = [r.files for r in load_samples(cfg).records]  # raw depth for the depth branch
    inputs = {os.path.abspath(p) for f in files for p in f.values()}
    reads: Counter[str] = Counter()
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) in inputs:
            reads[os.path.abspath(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    monkeypatch.setattr(builtins, "open", counting_open)
    report = cache_teacher(cfg)
    monkeypatch.undo()
    assert set(reads) == inputs and max(reads.values()) == 1, reads.most_common(2)
    assert report.hashed_files == len(inputs)
    assert open_cache(out).read("input_hash").tolist() == FileHashes(None).sample_digests(files)
    remembered = json.loads((out / ".input-hashes.json").read_text())["files"]
    assert list(remembered) == sorted(inputs)
    for path, (size, mtime, digest) in remembered.items():
        st = os.stat(path)
        assert (size, mtime, digest) == (st.st_size, st.st_mtime_ns, file_digest(path))


@pytest.mark.parametrize("slow", ["decoding", "model"])
def test_the_reported_waiting_share_is_the_decoding_the_model_waited_for(
        teacher_sample, tmp_path, monkeypatch, slow):
    """`model_waited` (final line, cache-info) is the share of the loop the model spent
    waiting for decoded samples: near all of it when decoding is slow, little when the
    model is (only the first job's decoding cannot overlap)."""
    from stages.teacher.languagebind import LanguageBind
    from stages.teacher.run import ShardWorker

    root, _ = teacher_sample
    prepare, encode = ShardWorker.prepare, LanguageBind.encode_pixels

    def slow_prepare(self, *args, **kwargs):
        time.sleep(0.15 if slow == "decoding" else 0.0)
        return prepare(self, *args, **kwargs)

    def slow_encode(self, *args, **kwargs):  # 4 modalities: 0.4 s per job
        time.sleep(0.1 if slow == "model" else 0.0)
        return encode(self, *args, **kwargs)

    monkeypatch.setattr(ShardWorker, "prepare", slow_prepare)
    monkeypatch.setattr(LanguageBind, "encode_pixels", slow_encode)
    report = cache_teacher(config(root, tmp_path / "c.zarr", split=["val"], rows_per_shard=2,
                                  decode_workers=1))
    assert report.model_busy + report.model_waited <= 1
    if slow == "decoding":  # 12 x 0.15 s of decoding in one worker: the model waits
        assert report.model_waited > 0.6 and report.model_busy < 0.4, report
    else:  # 6 jobs x 0.4 s in the model; decoding overlaps all but the first job
        assert report.model_waited < 0.3 and report.model_busy > 0.6, report


def test_a_complete_store_needs_no_lock_and_is_not_written(teacher_sample, tmp_path,
                                                          monkeypatch):
    """A read-only but complete store failed on its .lock even with nothing to do."""
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    cache_teacher(config(root, out, split=["val"], rows_per_shard=4))
    (out / ".lock").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def no_lock(path):
        raise PermissionError(13, "Permission denied", str(path / ".lock"))

    monkeypatch.setattr("stages.teacher.run.writer_lock", no_lock)
    report = cache_teacher(config(root, out, split=["val"], rows_per_shard=4))
    assert report.status == "complete"
    assert not (out / ".lock").exists()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_out_that_is_a_file_is_named(teacher_sample, tmp_path, capsys):
    from pipeline.cli import main

    root, _ = teacher_sample
    target = tmp_path / "c.zarr"
    target.write_text("not a store")
    (tmp_path / "none.yaml").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["cache-teacher", "--dataset", "sample", "--root", str(root), "--teacher-root",
              str(root / "teacher"), "--split", "val", "--out", str(target), "--params",
              str(tmp_path / "none.yaml")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert "--out is a file, not a folder" in err and "store folder" in err
    assert "Errno" not in err and target.read_text() == "not a store"


def test_auto_branches_follow_the_teacher_folders(teacher_sample, tmp_path):
    """`auto`: a modality's own branch where the teacher root has it (the fitted default
    teacher's event / LiDAR), else image, said once; an explicit missing branch fails."""
    import logging
    import shutil

    from stages.teacher.checkpoints import BRANCH_FOLDERS

    root, _ = teacher_sample  # the teacher has LanguageBind_Image and _Depth only
    cfg = config(root, tmp_path / "a.zarr")
    assert cfg.modality_branch == "auto"
    assert cfg.branch_map() == {"rgb": "image", "depth": "depth", "event": "image",
                                "lidar": "image"}
    assert cfg.auto_fallbacks() == [
        f"event -> image: no LanguageBind_Event under {root / 'teacher'}",
        f"lidar -> image: no LanguageBind_Lidar under {root / 'teacher'}"]
    assert cfg.branch_map(fitting=True)["event"] == "event"  # fit-teacher makes them
    own = tmp_path / "teacher"
    shutil.copytree(root / "teacher", own)
    shutil.copytree(own / BRANCH_FOLDERS["image"], own / BRANCH_FOLDERS["lidar"])
    mixed = TeacherConfig(dataset="sample", root=str(root), out=str(tmp_path / "b.zarr"),
                          teacher_root=str(own), modality_branch={"depth": "image"})
    assert mixed.branch_map() == {"rgb": "image", "depth": "image", "event": "image",
                                  "lidar": "lidar"}
    fingerprint = teacher_fingerprint(mixed, ["a"])
    assert fingerprint["modality_branch"] == mixed.branch_map()
    assert set(fingerprint["checkpoints"]) == {"image", "lidar"}
    with pytest.raises(PipelineError, match="no LanguageBind_Event/ under teacher root"):
        teacher_fingerprint(config(root, tmp_path / "c.zarr", modality_branch={"event": "event"}),
                            ["a"])
    with pytest.raises(PipelineError, match="must be auto or a mapping"):
        config(root, tmp_path / "d.zarr", modality_branch="own").validate()
    log = logging.getLogger("pipeline.teacher")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        cache_teacher(config(root, tmp_path / "e.zarr", split=["val"]))
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    notes = [r.getMessage() for r in records if "-> image" in r.getMessage()]
    assert len(notes) == 2 and notes[0].startswith("event -> image: no LanguageBind_Event")
