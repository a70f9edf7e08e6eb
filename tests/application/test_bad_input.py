import copy
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from any2seg import datasets
from any2seg.errors import DatasetError, PipelineError
from pipeline.cli import main
from tests.layouts import FRAMES, save
from tests.tiny_run import nan_scene_copy

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SCENE = "cloud/train/MAP_1_point1"


def path(root, top, kind, frame=FRAMES[0], scene=SCENE):
    return root / top / scene / f"{frame}_{kind}_front.png"


def test_missing_modality_file_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "lidar", "lidar")
    victim.unlink()
    with pytest.raises(DatasetError) as err:
        datasets.load("deliver", root, "train")
    msg = str(err.value)
    assert str(victim) in msg and "--skip-bad" in msg and "\n" not in msg
    # a modality that is not requested does not matter
    assert len(datasets.load("deliver", root, "train", modalities=["rgb", "depth"])) == 6


def test_skip_bad_logs_and_skips_missing(deliver_root, caplog):
    root, _ = deliver_root
    path(root, "event", "event").unlink()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        ds = datasets.load("deliver", root, "train", skip_bad=True)
    assert len(ds) == 5
    assert f"{SCENE}/{FRAMES[0]}" not in ds.ids
    assert any("event" in r.getMessage() for r in caplog.records)


def test_truncated_png_is_named_on_access(deliver_root):
    root, _ = deliver_root
    victim = path(root, "img", "rgb")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    ds = datasets.load("deliver", root, "train")
    index = ds.ids.index(f"{SCENE}/{FRAMES[0]}")
    with pytest.raises(DatasetError) as err:
        ds[index]
    assert str(victim) in str(err.value) and "corrupt or truncated" in str(err.value)
    assert victim.read_bytes() == data[: len(data) // 2]  # nothing rewritten


def test_garbage_file_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "hha", "depth", frame=FRAMES[1])
    victim.write_bytes(b"this is not a png")
    ds = datasets.load("deliver", root, "train", skip_bad=True)
    assert f"{SCENE}/{FRAMES[1]}" not in ds.ids and len(ds) == 5
    with pytest.raises(DatasetError, match="cannot decode"):
        datasets.load("deliver", root, "train")[1]


def test_label_out_of_range_is_refused(deliver_root):
    root, _ = deliver_root
    victim = path(root, "semantic", "semantic")
    red = np.full((24, 32), 7, np.uint8)
    red[3, 3] = 40
    save(victim, np.stack([red, red, red], axis=2))
    ds = datasets.load("deliver", root, "train")
    with pytest.raises(DatasetError) as err:
        ds[0]
    assert str(victim) in str(err.value) and "40" in str(err.value)
    assert len(datasets.load("deliver", root, "train", skip_bad=True)) == 5


def test_size_mismatch_of_non_event_modality_is_refused(deliver_root):
    root, _ = deliver_root
    victim = path(root, "lidar", "lidar")
    save(victim, np.zeros((12, 16), np.uint8))
    with pytest.raises(DatasetError, match="16x12"):
        datasets.load("deliver", root, "train")[0]


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load("deliver", tmp_path / "nope", "train")
    with pytest.raises(DatasetError, match="make-sample"):
        datasets.info("sample", tmp_path / "nope")


def test_empty_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a DELIVER root"):
        datasets.load("deliver", tmp_path / "empty", "train")


def test_parent_of_root_gets_a_hint(deliver_root):
    root, _ = deliver_root
    with pytest.raises(DatasetError, match=f"did you mean --root {root}"):
        datasets.info("deliver", root.parent)


def test_root_with_no_samples_for_split(deliver_root):
    root, _ = deliver_root
    with pytest.raises(DatasetError, match="no samples"):
        datasets.load("deliver", root, "test", condition="cloud")


def test_mcubes_missing_npy_and_bad_root(mcubes_root, tmp_path):
    root, _ = mcubes_root
    victim = next((root / "polL_aolp_cos").iterdir())
    victim.unlink()
    with pytest.raises(DatasetError, match="polL_aolp_cos"):
        datasets.load("mcubes", root, ["train", "val", "test"], cmnext_val=False)
    with pytest.raises(DatasetError, match="not an MCubeS root"):
        datasets.load("mcubes", tmp_path, "train")


def test_mcubes_corrupt_npy(mcubes_root):
    root, _ = mcubes_root
    victim = next((root / "polL_dolp").iterdir())
    victim.write_bytes(b"\x93NUMPY garbage")
    ds = datasets.load("mcubes", root, ["train", "test"])
    with pytest.raises(DatasetError, match="corrupt"):
        [s for s in ds]


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="known datasets: deliver, mcubes, sample"):
        datasets.load("cityscapes", ".", "train")


# ---------------------------------------------------------------------------------------
# the command line: every bad input ends in one line naming the key (or flag) and the fix
# ---------------------------------------------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
NAN = float("nan")


def params_with(tmp_path, edits):
    """The project's params.yaml with dotted keys replaced (a missing group is created)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in edits.items():
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_cli(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code, err, *named):
    assert code not in (0, None), err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in named:
        assert text in err, (text, err)


# (command, params.yaml edits, extra arguments, texts the error must contain); a params
# value is named as `<params file>: group.key`, a flag as the flag
CASES = [
    # train: every tunable where it is read into its dataclass
    ("train", {"train.crop": 7}, [], ["train.crop", ">= 29", "got 7"]),
    ("train", {}, ["--crop", "28"], ["--crop", ">= 29", "multiple of 32"]),
    ("train", {"train.augment.scale": [2.0, 0.5]}, [], ["train.augment.scale",
                                                        "0 < lo <= hi"]),
    ("train", {"train.augment.scale": [0.0, 1.0]}, [], ["train.augment.scale"]),
    ("train", {"train.augment.scale": [1.0]}, [], ["train.augment.scale"]),
    ("train", {"train.augment.jitter": 1.5}, [], ["train.augment.jitter", "[0, 1]"]),
    ("train", {"student.embed_dim": 0}, [], ["student.embed_dim", ">= 1"]),
    ("train", {"student.dropout": 3.0}, [], ["student.dropout", "[0, 1)"]),
    ("train", {"student.dropout": 1.0}, [], ["student.dropout", "[0, 1)"]),
    ("train", {"student.mff.iterations": -1}, [], ["student.mff.iterations", ">= 1"]),
    ("train", {"student.mff.iterations": 0}, [], ["student.mff.iterations"]),
    ("train", {"student.mff.weights": 1}, [], ["student.mff", "unknown key 'weights'"]),
    ("train", {"student.backbone": "mit_b9"}, [], ["student.backbone", "mit_b5"]),
    ("train", {"student.missing": "drop"}, [], ["student.missing", "zero-fill"]),
    ("train", {"train.steps": 0}, [], ["train.steps", ">= 1"]),
    ("train", {"train.steps": -10}, [], ["train.steps", ">= 1"]),
    ("train", {}, ["--steps", "0"], ["--steps", ">= 1"]),
    ("train", {}, ["--epochs", "-1"], ["--epochs", "> 0"]),
    ("train", {"train.steps": None, "train.epochs": 0}, [], ["train.epochs", "> 0"]),
    ("train", {"train.batch_size": 0}, [], ["train.batch_size", ">= 1"]),
    ("train", {"train.lr": 0}, [], ["train.lr", "> 0"]),
    ("train", {"train.lr": NAN}, [], ["train.lr", "finite"]),
    ("train", {"train.weight_decay": -0.1}, [], ["train.weight_decay", ">= 0"]),
    ("train", {"train.warmup": 1.0}, [], ["train.warmup", "[0, 1)"]),
    ("train", {"train.warmup_ratio": 2.0}, [], ["train.warmup_ratio", "[0, 1]"]),
    ("train", {"train.power": -1.0}, [], ["train.power", ">= 0"]),
    ("train", {"train.seed": -1}, [], ["train.seed", "4294967295"]),
    ("train", {"train.workers": -1}, [], ["train.workers", ">= 0"]),
    ("train", {"train.modality_dropout": 1.5}, [], ["train.modality_dropout", "[0, 1]"]),
    ("train", {"train.val_every": -1}, [], ["train.val_every", "0 validates only after"]),
    ("train", {"train.val_limit": 0}, [], ["train.val_limit", "null"]),
    ("train", {"train.checkpoint_every": 0}, [], ["train.checkpoint_every", ">= 1"]),
    ("train", {"train.device": "gpu"}, [], ["train.device", "cuda:N"]),
    ("train", {"train.modalities": ["rgb", "thermal"]}, [], ["train.modalities", "'thermal'",
                                                             "rgb, depth, event, lidar"]),
    ("train", {"train.modalities": ["rgb", "rgb"]}, [], ["train.modalities", "distinct"]),
    ("train", {"train.crop": "big"}, [], ["train.crop must be an integer", "'big'"]),
    ("train", {"train.loss": "strong"}, [], ["train.loss must be a mapping"]),
    ("train", {"train.loss.w_cr": NAN}, [], ["train.loss.w_cr", "finite", ">= 0"]),
    ("train", {"train.loss.w_se": -1.0}, [], ["train.loss.w_se", ">= 0"]),
    ("train", {"train.loss.w_teacher_decoded": NAN}, [],
     ["train.loss.w_teacher_decoded", "finite", ">= 0"]),
    ("train", {"train.loss.w_sup": 0, "train.loss.w_cr": 0, "train.loss.w_se": 0}, [],
     ["train.loss.w_sup", "nothing would be trained"]),
    ("train", {"train.loss.tau_cr": 0}, [], ["train.loss.tau_cr", "> 0"]),
    ("train", {"train.loss.tau_se": -0.1}, [], ["train.loss.tau_se", "> 0"]),
    ("train", {"train.loss.ohem_thresh": 0}, [], ["train.loss.ohem_thresh", "(0, 1]"]),
    ("train", {"train.loss.w_xx": 1}, [], ["train.loss", "unknown key 'w_xx'"]),
    ("train", {}, ["--variant", "mit_b9"], ["--variant", "mit_b0", "timm:NAME"]),
    ("train", {}, ["--device", "gpu"], ["--device", "cuda:N"]),
    # evaluate: the eval group and flags, checked before the checkpoint is read
    ("evaluate", {}, ["--limit", "0"], ["--limit", ">= 1"]),
    ("evaluate", {}, ["--limit", "-1"], ["--limit", ">= 1", "got -1"]),  # was taken as all
    ("evaluate", {"eval.limit": 0}, [], ["eval.limit", ">= 1"]),
    ("evaluate", {"eval.stride": 2000}, [], ["eval.stride", "[1, 1024]"]),
    ("evaluate", {"eval.crop": 0}, [], ["eval.crop", ">= 1"]),
    ("evaluate", {"eval.examples": -1}, [], ["eval.examples", ">= 0"]),
    ("evaluate", {"eval.setting": "mis"}, [], ["eval.setting", "miss"]),
    ("evaluate", {"eval.missing": "drop"}, [], ["eval.missing", "zero-fill", "black"]),
    ("evaluate", {"eval.protocol": "paper"}, [], ["eval.protocol", "official, native"]),
    ("evaluate", {}, ["--setting", "mis"], ["--setting", "mss, miss, sensor, all"]),
    # cache-teacher: checked before a model is loaded or a store is created
    ("cache-teacher", {}, ["--scheduler", "local:0"], ["--scheduler", "N >= 1"]),
    ("cache-teacher", {}, ["--scheduler", "foo"], ["--scheduler", "tcp://HOST:PORT"]),
    ("cache-teacher", {}, ["--scheduler", "tcp://host"], ["--scheduler", "tcp://HOST:PORT"]),
    ("cache-teacher", {"teacher.scheduler": "local:-2"}, [], ["teacher.scheduler"]),
    ("cache-teacher", {}, ["--modalities", "rgb,thermal"], ["--modalities", "'thermal'",
                                                            "rgb, depth, event, lidar"]),
    ("cache-teacher", {}, ["--modality-branch", "thermal=image"], ["--modality-branch",
                                                                   "'thermal'"]),
    ("cache-teacher", {"teacher.modality_branch": {"lidr": "image"}}, [],
     ["teacher.modality_branch", "lidr"]),
    # lidar and event are branches of the fitted default teacher; radar is none
    ("cache-teacher", {"teacher.modality_branch": {"lidar": "radar"}}, [],
     ["teacher.modality_branch", "branch 'radar'", "image, depth, thermal, event, lidar"]),
    ("cache-teacher", {"teacher.modality_branch": {"lidar": "radar"}},
     ["--modality-branch", "rgb=image"], ["teacher.modality_branch", "branch 'radar'"]),
    ("cache-teacher", {}, ["--modality-branch", "lidar=radar"], ["--modality-branch",
                                                                 "branch 'radar'"]),
    ("cache-teacher", {"teacher.batch_size": 0}, [], ["teacher.batch_size", "[1, 65536]"]),
    ("cache-teacher", {"teacher.dtype": "bfloat16"}, [], ["teacher.dtype", "float16"]),
    ("cache-teacher", {"teacher.class_prompt": "a photo"}, [], ["teacher.class_prompt", "{}"]),
    ("cache-teacher", {"teacher.root": 3}, [], ["teacher.root must be a string"]),
    ("cache-teacher", {"teacher.captioner": "blip"}, [], ["teacher.captioner", "template"]),
    ("cache-teacher", {}, ["--captioner", "blip"], ["--captioner", "llama-adapter"]),
    ("cache-teacher", {}, ["--dtype", "int8"], ["--dtype", "float32"]),
    # a dataset given on the command line does not inherit params' root of another one
    ("cache-teacher", {}, ["--dataset", "mcubes"], ["data/MCubeS/multimodal_dataset",
                                                    "does not exist"]),
    # sizes that would exhaust the memory are bounded where they are read
    ("cache-teacher", {"teacher.batch_size": 1000000000000}, [],
     ["teacher.batch_size", "[1, 65536]"]),
    # an empty value is an error, never the default in disguise
    ("train", {}, ["--cache", ""], ["--cache is empty"]),
    ("train", {}, ["--out="], ["--out is empty"]),
    ("cache-teacher", {}, ["--split", ""], ["--split is empty"]),
    ("evaluate", {}, ["--out", ""], ["--out is empty"]),
    ("train", {}, ["--steps", "2", "--epochs", "1"], ["--steps and --epochs", "give one"]),
    ("train", {}, ["--out", "x" * 300], ["--out", "longer than the filesystem allows"]),
    ("evaluate", {}, ["--out", "x" * 300], ["--out", "longer than the filesystem allows"]),
]

# commands without a params file: (arguments, texts the error must contain)
FLAG_CASES = [
    (["make-sample", "--size", "1000000000"], ["--size", "[64, 4096]"]),
    (["make-sample", "--train", "1000000000"], ["--train", "[0, 100000]"]),
    (["make-sample", "--val", "-1"], ["--val", "[0, 100000]"]),
    (["make-sample", "--frames-per-scene", "1000000000"], ["--frames-per-scene"]),
    (["make-sample", "--workers", "0"], ["--workers", ">= 1"]),
    (["make-sample", "--workers", "-3"], ["--workers", ">= 1"]),
    (["make-sample", "--out", ""], ["--out is empty"]),
    (["cache-info", ""], ["argument 2 is empty"]),
    (["pack", "--split", ""], ["--split is empty"]),
]


@pytest.mark.parametrize("key,value", [("hidden", 10000000), ("image_size", 100000),
                                       ("batch_size", 10**9)])
def test_fit_sizes_are_bounded(key, value, capsys, tmp_path, monkeypatch):
    """teacher.fit.hidden 10000000 ended in a 41-line allocator traceback."""
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, {f"teacher.fit.{key}": value})
    code, _, err = run_cli(capsys, ["fit-teacher", "--params", params])
    assert_one_line_error(code, err, f"teacher.fit.{key} must be <=", str(value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize("case", FLAG_CASES, ids=[" ".join(c[0]) for c in FLAG_CASES])
def test_bad_flag_is_one_line_naming_it(case, capsys, tmp_path, monkeypatch):
    args, named = case
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    code, _, err = run_cli(capsys, args)
    assert_one_line_error(code, err, *named)
    assert time.perf_counter() - start < 30  # refused, not started (it used to hang)
    assert list(tmp_path.iterdir()) == []


def _case_id(case):
    command, edits, args, _ = case
    return f"{command}:{' '.join(args) or next(iter(edits), '')}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_config_is_one_line_naming_the_key(case, capsys, tmp_path, monkeypatch):
    command, edits, args, named = case
    monkeypatch.chdir(tmp_path)  # nothing may be created: checked below
    params = params_with(tmp_path, edits)
    extra = ["--checkpoint", tmp_path / "best.pt"] if command == "evaluate" else []
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, [command, "--params", params, *extra, *args])
    assert_one_line_error(code, err, *named)
    if edits and not args:
        assert f"{params}: " in err  # the file is named with the key
    assert sorted(tmp_path.rglob("*")) == before  # refused before anything was written


@pytest.mark.parametrize("command", ["train", "cache-teacher", "evaluate"])
def test_a_yaml_syntax_error_in_params_names_file_line_and_column(command, capsys, tmp_path,
                                                                   monkeypatch):
    """The parser's line and column survive into the one-line error (the old message kept
    only its first line, "mapping values are not allowed here", with no place)."""
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  steps: 3\n  lr: 0.001\n   crop: 64\n")
    extra = ["--checkpoint", tmp_path / "best.pt"] if command == "evaluate" else []
    code, out, err = run_cli(capsys, [command, "--params", params, *extra])
    assert_one_line_error(code, err, f"{params}:4:8: invalid YAML: mapping values are not "
                          "allowed here")


def test_scheduler_local_0_fails_at_once_and_leaves_the_store_unlocked(teacher_sample,
                                                                        tmp_path, capsys):
    """It used to start a cluster with no worker and wait forever holding the lock."""
    root, _ = teacher_sample
    out = tmp_path / "cache.zarr"
    args = ["cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
            "--params", params_with(tmp_path, {})]
    start = time.perf_counter()
    code, _, err = run_cli(capsys, [*args, "--scheduler", "local:0"])
    assert time.perf_counter() - start < 10
    assert_one_line_error(code, err, "--scheduler", "local:N")
    assert not out.exists()


def test_unreachable_cluster_fails_in_its_timeout_and_releases_the_lock(teacher_sample,
                                                                        tmp_path, capsys):
    import dask

    from any2seg.store import writer_lock

    root, _ = teacher_sample
    out = tmp_path / "cache.zarr"
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # the fixture's teacher has image and depth towers only (no fitted event / lidar)
    image_only = {"teacher.modality_branch": {"rgb": "image", "depth": "depth",
                                              "event": "image", "lidar": "image"}}
    args = ["cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
            "--params", params_with(tmp_path, image_only),
            "--scheduler", f"tcp://127.0.0.1:{port}"]
    start = time.perf_counter()
    import distributed  # noqa: F401  (its config must outlive the block below)

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        code, _, err = run_cli(capsys, args)
    assert time.perf_counter() - start < 30
    assert_one_line_error(code, err, f"tcp://127.0.0.1:{port}", "within 1s",
                          "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT")
    assert not (out / "zarr.json").exists()  # nothing computed or created for nothing
    with writer_lock(out):  # released: a second lock on the same file succeeds
        pass


def test_modalities_subset_works_with_the_default_params(teacher_sample, tmp_path, capsys):
    """params.yaml maps all four modalities to branches; a run on two of them uses two."""
    from any2seg.store import open_cache

    root, _ = teacher_sample
    out = tmp_path / "rd.zarr"
    code, printed, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
        "--params", params_with(tmp_path, {}), "--modalities", "rgb,depth", "--split", "val",
        "--modality-branch", "depth=image"])
    assert code == 0, err
    assert "computed" in printed
    cache = open_cache(out)
    assert cache.modalities == ["rgb", "depth"]
    assert cache.attrs["teacher_fingerprint"]["modality_branch"] == {"depth": "image",
                                                                     "rgb": "image"}


def test_datasets_check_fails_on_a_root_without_samples(tmp_path, capsys):
    for folder in ("img", "hha", "event", "lidar", "semantic"):
        (tmp_path / "empty" / folder).mkdir(parents=True)
    code, out, err = run_cli(capsys, ["datasets", "check", "--dataset", "deliver", "--root",
                                      tmp_path / "empty"])
    assert_one_line_error(code, err, "no deliver samples", str(tmp_path / "empty"),
                          "img/<condition>/<split>/<scene>/<frame>_rgb_front.png")
    mcubes = tmp_path / "mcubes"
    (mcubes / "list_folder").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (mcubes / "list_folder" / f"{split}.txt").write_text("")
    code, out, err = run_cli(capsys, ["datasets", "check", "--dataset", "mcubes", "--root",
                                      mcubes])
    assert_one_line_error(code, err, "no mcubes samples", "list_folder/<split>.txt")


def test_datasets_check_names_an_empty_split(deliver_root, capsys):
    root, _ = deliver_root
    shutil.rmtree(root / "img" / "sun")  # the only test scene
    code, out, _ = run_cli(capsys, ["datasets", "check", "--dataset", "deliver", "--root",
                                    root])
    assert code == 1 and "split test: no samples; expected" in out


def test_non_finite_teacher_targets_are_named_with_the_fix(sample_cache, tmp_path):
    from stages.student.config import TrainConfig
    from stages.student.model import StudentConfig
    from stages.student.train import train

    root, cache = sample_cache
    broken = nan_scene_copy(cache, tmp_path / "nan.zarr")
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(broken),
                      out=str(tmp_path / "run"), steps=2, batch_size=2, crop=64, workers=0,
                      val_limit=1)
    with pytest.raises(PipelineError) as err:
        train(StudentConfig(embed_dim=16), cfg, progress=False)
    msg = str(err.value)
    assert "L_cr = nan" in msg and f"teacher cache {broken} holds non-finite E_m/E_S" in msg
    assert "--overwrite" in msg and "lower train.lr" not in msg


def test_library_calls_are_validated_too(sample_cache, tmp_path):
    """train() and cache_teacher() check their configs before touching anything."""
    from stages.student.config import TrainConfig
    from stages.student.model import StudentConfig
    from stages.student.train import train
    from stages.teacher.run import TeacherConfig, cache_teacher

    root, cache = sample_cache
    cfg = TrainConfig(dataset="sample", root=str(root), cache=str(cache),
                      out=str(tmp_path / "run"), steps=0)
    with pytest.raises(PipelineError, match=r"^train.steps must be an integer >= 1"):
        train(StudentConfig(), cfg, progress=False)
    with pytest.raises(PipelineError, match=r"^teacher.scheduler must be local:N"):
        cache_teacher(TeacherConfig(root=str(root), out=str(tmp_path / "c.zarr"),
                                    scheduler="local:0"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "c.zarr").exists()


# ---------------------------------------------------------------------------------------
# --help lists the registered choices of every option with a closed set
# ---------------------------------------------------------------------------------------
def _registered():
    from stages.student.encoder import backbone_names
    from stages.student.eval_config import INFERENCE_MODES, SETTINGS
    from stages.student.model import MISSING_MODES
    from stages.student.protocol import PROTOCOLS
    from stages.teacher import captioners
    from stages.teacher.run import STORE_DTYPES

    return [
        (["datasets", "info"], "--dataset", datasets.available()),
        (["datasets", "check"], "--dataset", datasets.available()),
        (["pack"], "--dataset", datasets.available()),
        (["cache-teacher"], "--dataset", datasets.available()),
        (["cache-teacher"], "--captioner", captioners.available()),
        (["cache-teacher"], "--device", ["auto", "cpu", "cuda", "cuda:N"]),
        (["cache-teacher"], "--dtype", list(STORE_DTYPES)),
        (["train"], "--dataset", datasets.available()),
        (["train"], "--variant", backbone_names()),
        (["train"], "--device", ["auto", "cpu", "cuda", "cuda:N"]),
        (["evaluate"], "--dataset", datasets.available()),
        (["evaluate"], "--setting", [*SETTINGS, "all"]),
        (["evaluate"], "--mode", list(INFERENCE_MODES)),
        (["evaluate"], "--protocol", list(PROTOCOLS)),
        (["evaluate"], "--missing", list(MISSING_MODES)),
        (["evaluate"], "--device", ["auto", "cpu", "cuda", "cuda:N"]),
    ]


def _help_choices(capsys, command, option):
    code, out, _ = run_cli(capsys, [*command, "--help"])
    assert code == 0
    line = next(x for x in out.splitlines() if x.strip().startswith(option + " "))
    return line.split("[", 1)[1].split("]", 1)[0].split("|")


def test_help_lists_the_registered_choices(capsys):
    for command, option, names in _registered():
        assert _help_choices(capsys, command, option) == list(names), (command, option)
    assert {"template", "llama-adapter", "hf"} <= set(_help_choices(capsys, ["cache-teacher"],
                                                                    "--captioner"))


def test_help_follows_the_registries(capsys):
    """A captioner, dataset or backbone registered at run time appears in --help and is
    accepted: the choices are read from the registries, not copied."""
    from any2seg.datasets import registry
    from stages.student import encoder
    from stages.teacher import captioners
    from stages.teacher.captioners.template import TemplateCaptioner

    class Plain(TemplateCaptioner):
        name = "plain-test"

    reader = copy.copy(datasets.get("deliver"))
    reader.name = "deliver-copy"
    try:
        captioners.register(Plain)
        datasets.register(reader)
        encoder.register("tiny:", ["tiny:NAME"])(lambda name, pretrained=None: None)
        assert "plain-test" in _help_choices(capsys, ["cache-teacher"], "--captioner")
        assert "deliver-copy" in _help_choices(capsys, ["train"], "--dataset")
        assert "tiny:NAME" in _help_choices(capsys, ["train"], "--variant")
        code, _, err = run_cli(capsys, ["datasets", "info", "--dataset", "deliver-copy",
                                        "--root", ROOT / "nope"])
        assert_one_line_error(code, err, "deliver-copy root", "does not exist")  # accepted
    finally:
        captioners._REGISTRY.pop("plain-test", None)
        registry._REGISTRY.pop("deliver-copy", None)
        encoder._BACKBONES.pop("tiny:", None)
        encoder._NAMES.pop("tiny:", None)


# ---------------------------------------------------------------------------------------
# a failing run exits without "Exception ignored" noise from DVC's git backend
# ---------------------------------------------------------------------------------------
BUG_IN_THE_LOOP = """
import sys
import stages.student.train as t

def broken(*args, **kwargs):
    raise RuntimeError("a bug inside the training loop")

t.supervised = broken
from pipeline.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_failed_train_in_a_git_repo_prints_no_dulwich_tracebacks(sample_cache, tmp_path):
    """dvclive opens the DVC repository (dulwich packs) and never closes it; a crash kept it
    alive until interpreter shutdown, where four "Exception ignored in ... __del__"
    tracebacks followed the real one."""
    root, cache = sample_cache
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    (repo / "README").write_text("a project\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "a"],
                ["git", "gc", "-q"]):  # gc: objects in packs, as in a clone
        subprocess.run(cmd, cwd=repo, env=env, check=True)
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump({
        "dataset": {"name": "sample", "root": str(root)},
        "student": {"embed_dim": 16},
        "train": {"cache": str(cache), "out": str(repo / "run"), "steps": 2, "batch_size": 2,
                  "crop": 64, "workers": 0, "val_limit": 1}}))
    result = subprocess.run([sys.executable, "-c", BUG_IN_THE_LOOP, "train", "--params",
                             str(params)], cwd=repo, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "a bug inside the training loop" in result.stderr  # the real error is shown
    assert "Exception ignored" not in result.stderr, result.stderr[-2000:]


def test_non_finite_loss_causes_are_told_apart():
    """The message says what made the term non-finite, judged from what went into it."""
    from types import SimpleNamespace

    import torch

    from stages.student.config import TrainConfig
    from stages.student.data import Targets
    from stages.student.train import _likely_cause

    targets = Targets(visual=np.zeros((2, 1, 4), np.float32),
                      scene=np.zeros((2, 4), np.float32), classes=np.ones((3, 4), np.float32))
    cfg = TrainConfig(steps=1, lr=0.5, cache="c.zarr")
    ids = ["a", "b"]
    batch = {"index": torch.tensor([1, 0]), "label": torch.zeros(2, 2, 2, dtype=torch.long)}
    finite = SimpleNamespace(feats=[torch.zeros(2, 1, 4)], logits=torch.zeros(2, 3, 2, 2))
    diverged = SimpleNamespace(feats=[torch.full((2, 1, 4), float("inf"))],
                               logits=torch.zeros(2, 3, 2, 2))
    assert "training diverged (lower train.lr, now 0.5)" in \
        _likely_cause("L_sup", batch, diverged, targets, cfg, ids)
    blank = {**batch, "label": torch.full((2, 2, 2), 255)}
    assert "no labelled pixel" in _likely_cause("L_sup", blank, finite, targets, cfg, ids)
    assert "overflowed; lower train.lr" in _likely_cause("L_sup", batch, finite, targets, cfg,
                                                         ids)
    targets.scene[0, 1] = np.nan
    assert "holds non-finite E_m/E_S for a" in _likely_cause("L_cr", batch, finite, targets,
                                                             cfg, ids)
    targets.classes[2, 0] = np.inf
    assert "non-finite class embeddings E_C" in _likely_cause("L_se", batch, finite, targets,
                                                              cfg, ids)


def test_unpublished_branch_missing_from_the_teacher_folder_is_named(teacher_sample, tmp_path,
                                                                     capsys):
    """lidar maps to a branch only the fitted default teacher has; a folder of real
    LanguageBind downloads (image and depth here) lacks it: say so and how to map it."""
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    code, _, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", root / "teacher", "--out", out,
        "--params", params_with(tmp_path, {"teacher.modality_branch": {
            "rgb": "image", "depth": "depth", "event": "image", "lidar": "lidar"}})])
    assert_one_line_error(code, err, "LanguageBind_Lidar", "lidar=image", "fit-teacher")
    assert not (out / "zarr.json").exists()


# ---------------------------------------------------------------------------------------
# paths the filesystem refuses, failures outside the input: one line naming what to change
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_out_that_is_or_lies_under_a_file_is_named(command, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, {})
    afile = tmp_path / "afile.txt"
    afile.write_text("not a folder")
    extra = ["--checkpoint", tmp_path / "best.pt"] if command == "evaluate" else []
    for out, named in ((afile, "is a file, not a folder"),
                       (afile / "sub", f"({afile} above it)")):
        code, _, err = run_cli(capsys, [command, "--params", params, *extra, "--out", out])
        assert_one_line_error(code, err, f"--out {out}", named)
    assert afile.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "params.yaml"]


def test_label_of_the_wrong_size_is_named(deliver_root):
    root, _ = deliver_root
    victim = path(root, "semantic", "semantic")
    save(victim, np.zeros((12, 16, 3), np.uint8))
    with pytest.raises(DatasetError) as err:
        datasets.load("deliver", root, "train")[0]
    assert f"label {victim} is 16x12" in str(err.value) and "32x24" in str(err.value)


def test_teacher_root_that_is_a_file_is_named(teacher_sample, tmp_path, capsys):
    root, _ = teacher_sample
    afile = tmp_path / "teacher.txt"
    afile.write_text("")
    code, _, err = run_cli(capsys, [
        "cache-teacher", "--root", root, "--teacher-root", afile, "--out", tmp_path / "c.zarr",
        "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, f"teacher root {afile}", "is a file, not a folder")


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")])
def test_out_of_memory_names_the_setting_to_lower(error, capsys, tmp_path, monkeypatch):
    from any2seg import synth

    def exhausted(*args, **kw):
        raise error
    monkeypatch.setattr(synth, "make_sample", exhausted)
    code, _, err = run_cli(capsys, ["make-sample", "--out", tmp_path / "s"])
    assert_one_line_error(code, err, "out of memory", "lower --size or --workers")


def _cache_teacher_failing_with(monkeypatch, error):
    from stages.teacher import run

    def failing(*args, **kw):
        raise error
    monkeypatch.setattr(run, "cache_teacher", failing)


@pytest.mark.parametrize("errno_, named", [
    (28, ["no space left on the device while writing --out", "free space there",
          "keeps every finished row"]),
    (30, ["is on a read-only filesystem", "make it writable", "keeps every finished row"])])
def test_full_or_read_only_store_names_the_path_and_the_remedy(teacher_sample, tmp_path, capsys,
                                                               monkeypatch, errno_, named):
    root, _ = teacher_sample
    out = tmp_path / "c.zarr"
    _cache_teacher_failing_with(monkeypatch, OSError(errno_, os.strerror(errno_),
                                                     str(out / "scene" / "c" / "0")))
    code, _, err = run_cli(capsys, ["cache-teacher", "--root", root, "--teacher-root",
                                    root / "teacher", "--out", out,
                                    "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, str(out / "scene" / "c" / "0"), *named)


def test_read_only_store_lock_names_the_store(tmp_path, monkeypatch):
    from any2seg import runlock
    from any2seg.store import writer_lock

    def read_only(*args, **kw):
        raise OSError(30, "Read-only file system", str(tmp_path / "s.zarr" / ".lock"))
    monkeypatch.setattr(runlock.os, "open", read_only)
    with pytest.raises(PipelineError) as err:
        with writer_lock(tmp_path / "s.zarr"):
            pass
    assert f"--out {tmp_path / 's.zarr'} is not writable (Read-only file system)" in \
        str(err.value) and "make it writable" in str(err.value)


def test_vanished_dask_scheduler_is_named_with_what_a_rerun_does(teacher_sample, tmp_path,
                                                                 capsys, monkeypatch):
    from distributed.comm.core import CommClosedError

    root, _ = teacher_sample
    _cache_teacher_failing_with(monkeypatch, CommClosedError(
        "in <TCP (closed) ConnectionPool.gather local=tcp://127.0.0.1:50000 "
        "remote=tcp://127.0.0.1:8786>: Stream is closed"))
    code, _, err = run_cli(capsys, ["cache-teacher", "--root", root, "--teacher-root",
                                    root / "teacher", "--out", tmp_path / "c.zarr",
                                    "--scheduler", "tcp://127.0.0.1:8786",
                                    "--params", params_with(tmp_path, {})])
    assert_one_line_error(code, err, "dask scheduler at tcp://127.0.0.1:8786 went away",
                          "keeps every finished row", "rerun continues")


# ---------------------------------------------------------------------------------------
# Inputs that pass every check of the settings and go wrong where the work happens. Each
# command runs in a subprocess, so a native crash fails its row instead of the suite:
# (id, builder(tmp_path, deliver root) -> (arguments, Python run before the command),
# texts the one-line error must contain)

def _tiny_frames(tmp_path, root):
    """DELIVER frames of 24 x 32 px scored at their own size: below MiT's 29 px. The
    checkpoint is an untrained student (the frames are refused before it would matter)."""
    from dataclasses import asdict

    from stages.student.checkpoint import save_checkpoint
    from stages.student.model import StudentConfig, build_student

    reader = datasets.get("deliver")
    student = StudentConfig(embed_dim=16)
    mods = ["rgb", "depth", "event", "lidar"]
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, build_student(student, mods, len(reader.classes)), None, 0, 0.0,
                    {"student": asdict(student), "modalities": mods, "dataset": "deliver",
                     "classes": list(reader.classes),
                     "palette": [list(c) for c in reader.palette]})
    return ["evaluate", "--checkpoint", ckpt, "--dataset", "deliver", "--root", root,
            "--split", "train", "--protocol", "native", "--out", tmp_path / "metrics"], ""


# the disk fills (another process) after pack checked the free space: writes fail ENOSPC
DISK_FILLS = """
import errno, os
left, real = [20000], os.pwrite
def pwrite(fd, data, offset):
    if left[0] <= 0:
        raise OSError(errno.ENOSPC, "No space left on device")
    done = real(fd, data[:left[0]], offset)
    left[0] -= done
    return done
os.pwrite = pwrite
"""
# the kernel refuses a write inside HDF5 (RLIMIT_FSIZE: EFBIG instead of SIGXFSZ); closing
# the file crashed HDF5's C layer after that (SIGSEGV) before pack wrote through GuardedFile
WRITE_REFUSED = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
"""


def _pack_with(prelude):
    def build(tmp_path, root):
        return ["pack", "--dataset", "deliver", "--root", root, "--out",
                tmp_path / "packs" / "deliver.h5"], prelude
    return build


WORK_CASES = [
    ("evaluate: frames smaller than MiT accepts", _tiny_frames,
     ["sample cloud/train/MAP_1_point1/000120 of deliver is scored at 32x24 px",
      "smaller than the student's encoder accepts (29 px on each side)", "--protocol official"]),
    ("pack: the disk fills during the HDF5 write", _pack_with(DISK_FILLS),
     ["no space left on the disk of", "packs", "needs about"]),
    ("pack: write(2) fails inside HDF5", _pack_with(WRITE_REFUSED),
     ["could not write --out", "deliver.h5", "File too large", "nothing was left there"]),
]


@pytest.mark.parametrize("case", WORK_CASES, ids=[c[0] for c in WORK_CASES])
def test_failure_during_the_work_is_one_line(case, deliver_root, tmp_path):
    _, build, named = case
    root, _ = deliver_root
    args, prelude = build(tmp_path, root)
    script = f"{prelude}\nimport sys\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n"
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]  # not a signal (-11: SIGSEGV)
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    for text in named:
        assert text in lines[-1], (text, lines[-1])
    packs = tmp_path / "packs"
    assert not packs.exists() or list(packs.iterdir()) == []  # no half pack left
