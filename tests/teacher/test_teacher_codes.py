"""Teacher-code compression in stage one, teacher-code distillation and single-modality
training in stage two (not CodeAlign: that is tests/student/test_codealign_stages.py)."""

import json
import sys

import numpy as np
import pytest
import torch

from any2seg.errors import PipelineError
from any2seg.store import describe, open_cache
from stages.student.checkpoint_file import load_checkpoint_file
from stages.student.code_targets import NO_CODE, code_map, isolated_modality
from stages.student.codes import CodeTranslators, code_loss, decoded_loss
from stages.student.data import AugmentConfig, ScheduleSampler, StudentData, augment
from stages.teacher.codebook import SphericalKMeans, assign, decode, parse_dense
from stages.teacher.run import TeacherConfig, cache_teacher
from tests.killing import kill_after_first_rows
from tests.tiny_run import TINY_BACKBONE, logged

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PLAIN_ARRAYS = ["caption", "class_names", "classes", "done", "input_hash", "sample_id", "scene",
                "visual/depth", "visual/event", "visual/lidar", "visual/rgb"]


def config(root, out, **kw):
    return TeacherConfig(dataset="sample", root=str(root), out=str(out),
                         teacher_root=str(root / "teacher"), **kw)


def clustered_tokens(seed=0, centres=12, n=3000, d=16):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, d))
    x = c[rng.integers(0, centres, n)] + 0.05 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fit(tokens, k, seed, passes=2, batch=250):
    km = SphericalKMeans(k, seed)
    km.fit(lambda: (tokens[i:i + batch] for i in range(0, len(tokens), batch)), passes)
    return km.float16()


@pytest.fixture(scope="module")
def dense_cache(teacher_sample, tmp_path_factory):
    root, _ = teacher_sample
    out = tmp_path_factory.mktemp("dense") / "sample.zarr"
    cache_teacher(config(root, out, rows_per_shard=16, dense="codebook:16", dense_passes=1))
    return root, out


# -- stage one ---------------------------------------------------------------------------
def test_kmeans_is_deterministic_for_a_seed_and_codes_round_trip():
    tokens = clustered_tokens(centres=4)
    a, b = fit(tokens, 32, seed=5), fit(tokens, 32, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fit(tokens, 32, seed=6))
    # codes -> code vectors -> nearest code is the identity
    codes = np.arange(32, dtype=np.uint16)
    np.testing.assert_array_equal(assign(decode(codes, a), a), codes)
    # the fit found the clusters: every token is within a small angle of its code
    cos = (tokens * decode(assign(tokens, a), a).astype(np.float32)).sum(1)
    assert cos.mean() > 0.99
    assert parse_dense("codebook:1024") == 1024
    for bad in ("codebook:1", "codebook:70000", "kmeans:8", "codebook:"):
        with pytest.raises(ValueError):
            parse_dense(bad)


def test_too_few_tokens_for_k_is_one_line():
    with pytest.raises(PipelineError, match="at least K=64 patch tokens.*has 10"):
        fit(clustered_tokens(n=10), 64, seed=0)


def test_dense_store_holds_codebooks_codes_and_reports_them(dense_cache, capsys):
    root, out = dense_cache
    cache = open_cache(out)
    assert cache.verify() == []
    assert cache.dense["k"] == 16 and cache.dense["grid"] == [7, 7]
    for m in cache.modalities:
        book = cache.codebook(m)
        assert book.dtype == np.float16 and book.shape == (16, cache.dim)
    codes = cache.codes(cache.ids[:3], cache.modalities)
    assert codes.shape == (3, 4, 7, 7) and codes.dtype == np.uint16 and codes.max() < 16
    assert len(np.unique(codes[:, 0])) > 1
    info = describe(out)["dense"]
    assert info["bytes_per_sample"]["codes_uint16"] == 4 * 49 * 2
    assert info["bytes_per_sample"]["fp16_tokens"] == 4 * 49 * cache.dim * 2
    assert info["ratio_raw"] == cache.dim
    assert set(info["reconstruction_cosine"]) == set(cache.modalities)
    assert all(0 < c <= 1 for c in info["reconstruction_cosine"].values())
    from pipeline.cli import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["cache-info", str(out)], standalone_mode=True)
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "dense codes: K=16, 7x7" in text and "reconstruction cosine on" in text


def test_codes_are_the_nearest_code_of_the_teachers_patch_tokens(dense_cache):
    """The stored codes are the argmax over the stored float16 codebook of the projected
    patch tokens (recomputed here through the teacher for one sample)."""
    root, out = dense_cache
    from stages.teacher.run import ShardWorker, load_samples

    cfg = config(root, out, rows_per_shard=16, dense="codebook:16", dense_passes=1)
    worker = ShardWorker(cfg, load_samples(cfg), "cpu")
    tokens = next(worker.patch_tokens([0], 1))
    cache = open_cache(out)
    for m in cache.modalities:
        want = assign(tokens[m], cache.codebook(m))
        np.testing.assert_array_equal(cache.codes([cache.ids[0]], [m])[:, 0], want)


def test_dense_store_resumes_after_sigkill_with_identical_arrays(teacher_sample, tmp_path):
    root, _ = teacher_sample
    killed, reference = tmp_path / "killed.zarr", tmp_path / "ref.zarr"
    (tmp_path / "none.yaml").write_text("{}\n")
    args = [sys.executable, "-m", "pipeline.cli", "cache-teacher", "--dataset", "sample",
            "--root", str(root), "--teacher-root", str(root / "teacher"), "--out", str(killed),
            "--split", "val,test", "--rows-per-shard", "2", "--batch-size", "1",
            "--decode-workers", "1", "--dense", "codebook:8",
            "--params", str(tmp_path / "none.yaml")]
    kill_after_first_rows(args, killed, timeout=180)
    partial = open_cache(killed).done
    assert 0 < partial.sum() < partial.size, "the kill must land mid-run"
    kw = dict(split=["val", "test"], rows_per_shard=2, batch_size=1, dense="codebook:8")
    cache_teacher(config(root, killed, **kw))
    cache_teacher(config(root, reference, **kw))
    a, b = open_cache(killed), open_cache(reference)
    assert a.done.all() and a.array_names == b.array_names
    assert any(n.startswith("codes/") for n in a.array_names)
    for name in a.array_names:
        np.testing.assert_array_equal(a.group[name][:], b.group[name][:], err_msg=name)
    assert a.codebook_fingerprint == b.codebook_fingerprint


def test_dense_off_leaves_the_store_schema_unchanged(sample_cache, dense_cache):
    _, plain = sample_cache
    cache = open_cache(plain)
    assert sorted(cache.array_names) == PLAIN_ARRAYS
    assert sorted(p.name for p in plain.iterdir() if p.is_dir()) == \
        ["caption", "class_names", "classes", "done", "input_hash", "sample_id", "scene",
         "visual"]
    attrs = json.loads((plain / "zarr.json").read_text())["attributes"]
    assert "dense" not in attrs and "dense" not in attrs["teacher_fingerprint"]
    assert "dense" not in describe(plain)
    assert cache.codebook_fingerprint is None
    # the pooled targets of a dense store are those of the plain one, bit for bit
    dense = open_cache(dense_cache[1])
    for m in cache.modalities:
        np.testing.assert_array_equal(dense.group[f"visual/{m}"][:], cache.group[f"visual/{m}"][:])
    with pytest.raises(PipelineError, match="holds no dense codes"):
        cache.codes(cache.ids[:1], ["rgb"])


def test_asking_for_codes_of_a_plain_store_is_refused_not_rewritten(sample_cache, tmp_path):
    import shutil

    root, plain = sample_cache
    copy = tmp_path / "plain.zarr"
    shutil.copytree(plain, copy)
    before = {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    with pytest.raises(PipelineError, match="another teacher: dense .absent in the store, set"):
        cache_teacher(config(root, copy, rows_per_shard=16, dense="codebook:16"))
    assert {p: p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    with pytest.raises(PipelineError, match="teacher.dense must be codebook:K .*got .codebook:1."):
        config(root, copy, dense="codebook:1").validate()


def test_a_damaged_codebook_is_refused_without_touching_it(dense_cache, tmp_path):
    import shutil

    root, out = dense_cache
    copy = tmp_path / "d.zarr"
    shutil.copytree(out, copy)
    shard = open_cache(copy).shard_file("codebook/rgb", 0)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(PipelineError, match="codebook/rgb, all 16 codes"):
        open_cache(copy).check()
    with pytest.raises(PipelineError, match="codebook/rgb is damaged.*--overwrite"):
        cache_teacher(config(root, copy, rows_per_shard=16, dense="codebook:16",
                             dense_passes=1, repair=True))
    assert shard.read_bytes() == bytes(data)


# -- stage two ---------------------------------------------------------------------------
def test_code_map_follows_the_teachers_centre_crop():
    codes = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    # 8 x 16 image: short side 8 -> 224, long 16 -> 448; the centre 224 columns are seen
    got = code_map(codes, 8, 16, 224).numpy()
    assert got.shape == (2, 8, 16)
    assert (got[:, :, :4] == NO_CODE).all() and (got[:, :, 12:] == NO_CODE).all()
    np.testing.assert_array_equal(got[0, :, 4:12], np.repeat(np.repeat(
        codes[0].astype(np.int64), 2, 0), 2, 1))
    np.testing.assert_array_equal(got[1, 0, 4:12], [16, 16, 17, 17, 18, 18, 19, 19])


def test_codes_move_with_the_label_under_augmentation():
    codes = np.arange(49, dtype=np.uint16).reshape(1, 7, 7)
    maps = code_map(codes, 56, 56, 224)
    label = maps[0].clone()  # the same grid as a label: both must land on the same pixels
    images = {"rgb": torch.rand(3, 56, 56)}
    cfg = AugmentConfig(scale=[0.5, 2.0])
    for seed in range(6):
        rng = np.random.default_rng(seed)
        _, lab, moved = augment(images, label, 40, cfg, rng, maps)
        kept = lab != 255
        np.testing.assert_array_equal(moved[0][kept].numpy(), lab[kept].numpy())
        assert (moved[0][~kept] == NO_CODE).all()
        # the draws equal those of an augmentation without codes
        _, lab2 = augment(images, label, 40, cfg, np.random.default_rng(seed))
        assert torch.equal(lab, lab2)


@pytest.mark.parametrize("term", [code_loss, decoded_loss], ids=["code", "decoded"])
def test_code_terms_give_absent_modalities_zero_gradient(term):
    torch.manual_seed(0)
    mods = ["rgb", "depth", "event"]
    tr = CodeTranslators(mods, 8, 5, torch.randn(3, 5, 6))
    feats = torch.randn(4, 3, 8, 2, 2, requires_grad=True)
    present = torch.tensor([[1, 0, 1], [1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)
    codes = torch.randint(0, 5, (4, 3, 8, 8))
    loss = term(tr, feats, present, codes)
    loss.backward()
    grad = feats.grad
    assert (grad[~present] == 0).all() and (grad[present].abs().sum((-1, -2, -3)) > 0).all()
    for t in mods:  # depth is absent everywhere: none of its source translators learn
        w = tr.translate[f"depth->{t}"].weight.grad
        assert w is None or (w == 0).all()
        assert tr.translate[f"rgb->{t}"].weight.grad.abs().sum() > 0
    # what an absent modality's features hold does not change the loss
    other = feats.detach().clone()
    other[~present] = 100.0
    assert torch.equal(term(tr, other, present, codes), loss.detach())
    # cross-modal terms are there: changing depth's codes (target of rgb->depth) changes it
    codes2 = codes.clone()
    codes2[:, 1] = (codes2[:, 1] + 1) % 5
    assert not torch.isclose(term(tr, feats.detach(), present, codes2), loss.detach())


def test_decoded_loss_is_zero_when_all_mass_is_on_the_teachers_code():
    """softmax(logits) @ codebook against codebook[code]: one-hot logits on the teacher's
    code decode to exactly its vector (1 - cos = 0); anything else is > 0."""
    torch.manual_seed(0)
    mods, k = ["rgb", "depth"], 6
    books = torch.nn.functional.normalize(torch.randn(2, k, 4), dim=-1).half().float()
    tr = CodeTranslators(mods, k, k, books)
    with torch.no_grad():  # identity translators: logits = features
        for conv in tr.translate.values():
            conv.weight.copy_(torch.eye(k)[:, :, None, None])
            conv.bias.zero_()
    cell = torch.randint(0, k, (3, 2, 2))  # the same codes for both modalities
    codes = cell.repeat_interleave(4, -1).repeat_interleave(4, -2)[:, None].repeat(1, 2, 1, 1)
    codes[0, :, :4, :4] = NO_CODE  # a cell outside the teacher's view is ignored
    onehot = torch.nn.functional.one_hot(cell, k).permute(0, 3, 1, 2).float() * 60.0
    feats = onehot[:, None].repeat(1, 2, 1, 1, 1)
    present = torch.ones(3, 2, dtype=torch.bool)

    def loss(f):
        with torch.no_grad():
            return float(decoded_loss(tr, f, present, codes))

    assert loss(feats) < 1e-6
    wrong = torch.nn.functional.one_hot((cell + 1) % k, k).permute(0, 3, 1, 2).float() * 60.0
    assert loss(wrong[:, None].repeat(1, 2, 1, 1, 1)) > 0.05
    assert loss(torch.randn(3, 2, k, 2, 2)) > 0.05


def test_isolated_mode_never_shows_two_modalities(small_sample):
    from any2seg import datasets

    root, _ = small_sample
    mods = ["rgb", "depth", "event", "lidar"]
    samples = datasets.load("sample", root, "train", modalities=mods)
    data = StudentData(samples, mods, None, 32, AugmentConfig(), seed=11, single_modality=True)
    again = StudentData(samples, mods, None, 32, AugmentConfig(), seed=11, single_modality=True)
    shown = []
    for batch in ScheduleSampler(len(samples), 4, 6, seed=11):
        for key in batch:
            present = data[key]["present"]
            assert int(present.sum()) == 1
            assert torch.equal(present, again[key]["present"])
            assert int(present.nonzero()) == isolated_modality(11, key[2], key[1], 4)
            shown.append(int(present.nonzero()))
    assert len(set(shown)) == 4  # every modality appears, one at a time
    assert isolated_modality(11, 0, 3, 4) == isolated_modality(11, 0, 3, 4)
    assert len({isolated_modality(11, s, 3, 4) for s in range(20)}) > 1  # step matters


def test_training_with_codes_and_isolation(dense_cache, sample_cache, tmp_path):
    from stages.student.config import TrainConfig
    from stages.student.model import StudentConfig
    from stages.student.train import train

    root, out = dense_cache

    def cfg(cache, name, **kw):
        return TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                           out=str(tmp_path / name), steps=2, batch_size=2, crop=64, workers=0,
                           val_limit=1, checkpoint_every=1, **kw)

    student = StudentConfig(backbone=TINY_BACKBONE, embed_dim=16)  # codes, not the encoder
    with pytest.raises(PipelineError, match="w_teacher_code > 0 needs dense codes"):
        train(student, cfg(sample_cache[1], "plain", loss={"w_teacher_code": 1.0}), progress=False)
    result = train(student, cfg(out, "iso", loss={"w_teacher_code": 1.0}, single_modality=True),
                   progress=False)
    assert result["status"] == "trained" and np.isfinite(result["last_loss"])
    ckpt = load_checkpoint_file(tmp_path / "iso" / "last.pt")
    assert ckpt["meta"]["cache"]["codebook_fingerprint"] == open_cache(out).codebook_fingerprint
    assert any(k.startswith("translate.rgb->depth") for k in ckpt["translators"])
    best = load_checkpoint_file(tmp_path / "iso" / "best.pt")
    assert best["translators"] is None  # the student evaluated is the plain student
    code = (tmp_path / "iso" / "dvclive" / "plots" / "metrics" / "train" / "L_code.tsv")
    assert code.is_file()
    # the decoded-code target alone: translators built, L_decoded logged, no L_code
    with pytest.raises(PipelineError, match="w_teacher_decoded > 0 needs dense codes"):
        train(student, cfg(sample_cache[1], "plain2", loss={"w_teacher_decoded": 1.0}),
              progress=False)
    result = train(student, cfg(out, "dec", loss={"w_teacher_decoded": 1.0}), progress=False)
    assert result["status"] == "trained" and np.isfinite(result["last_loss"])
    metrics = logged(tmp_path / "dec")
    decoded = [float(v) for v in metrics["train/L_decoded"]["values"]]
    assert len(decoded) == 2 and all(0 < v <= 2 for v in decoded)
    assert "train/L_code" not in metrics
    ckpt = load_checkpoint_file(tmp_path / "dec" / "last.pt")
    assert any(k.startswith("translate.rgb->depth") for k in ckpt["translators"])
    with pytest.raises(PipelineError, match="train.modality_dropout"):
        TrainConfig(dataset="sample", steps=1, single_modality=True,
                    modality_dropout=0.5).validate()

