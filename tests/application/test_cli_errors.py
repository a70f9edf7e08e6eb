"""The command line's own checks: every bad flag or params.yaml key ends in one line naming
the key (or flag) and the fix before anything is written; a YAML syntax error names its line
and column; --help lists the registered choices of every option with a closed set."""

import copy
import time

import pytest

from any2seg import datasets
from tests.cli_errors import ROOT, assert_one_line_error, params_with, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

NAN = float("nan")


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
