"""`--help` shows the value a run uses and where it comes from: the parameters file when it
sets the key (`--params FILE` on the same command line, else ./params.yaml), else the config
dataclass; and a run resolves the same value."""

from pathlib import Path

import click
import pytest
import yaml

from pipeline.cli import cli
from pipeline.help_defaults import Tunable, dataclass_default, shown

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "cache-teacher", "evaluate")


def tunables():
    for name in COMMANDS:
        command = cli.commands[name]
        for param in command.params:
            if isinstance(param, Tunable):
                yield command, param


def help_default(command, param):
    _, text = param.get_help_record(click.Context(command))
    return text.rsplit("[default: ", 1)[1].rstrip("]")


def resolved(key, params):
    """The value a run resolves for `key` with no flag given, through the real loaders."""
    from stages.student.config import TrainConfig
    from stages.student.eval_config import EvalConfig
    from stages.teacher.run import TeacherConfig

    group, name = key.split(".", 1)
    if group == "eval":
        from any2seg.config import build
        return getattr(build(EvalConfig, dict(params.get("eval") or {}), "eval"), name)
    if group in ("train", "student"):
        if not {"steps", "epochs"} & set(params.get("train") or {}):  # a run needs a length
            params = {**params, "train": {"steps": 1}}
            if name in ("steps", "epochs"):
                return dataclass_default(key)
        student, cfg = TrainConfig.from_params(params, {})
        return getattr(student if group == "student" else cfg, name)
    cfg = TeacherConfig.from_params(params, {})
    return getattr(cfg, {"teacher.root": "teacher_root", "dataset.name": "dataset"}.get(
        key, name))


def test_every_tunable_flag_is_covered():
    assert len(list(tunables())) >= 30


@pytest.mark.parametrize("where", ["project", "elsewhere"])
def test_help_default_is_what_a_run_uses(where, tmp_path, monkeypatch):
    if where == "project":
        monkeypatch.chdir(ROOT)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
    else:
        monkeypatch.chdir(tmp_path)  # no params.yaml: the dataclass defaults
        params = {}
    for command, param in tunables():
        text = help_default(command, param)
        value = resolved(param.key, params)
        group, name = param.key.split(".", 1)
        in_file = name in (params.get(group) or {})
        source = f"params.yaml: {param.key}" if in_file else "built-in default"
        if param.fallback is not None and not in_file:  # the rule, not the dataclass's None
            assert text == param.fallback and value is None, (command.name, param.name)
        else:
            assert text == f"{shown(value)} ({source})", (command.name, param.name)
        if not in_file:
            assert value == dataclass_default(param.key)


def test_help_follows_an_edited_params_file(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("train: {batch_size: 3}\n")
    monkeypatch.chdir(tmp_path)
    batch = next(p for c, p in tunables() if c.name == "train" and p.name == "batch_size")
    assert help_default(cli.commands["train"], batch) == \
        "3 (params.yaml: train.batch_size)"
    crop = next(p for c, p in tunables() if c.name == "train" and p.name == "crop")
    assert help_default(cli.commands["train"], crop) == \
        f"{dataclass_default('train.crop')} (built-in default)"


@pytest.mark.parametrize("order", ["params first", "help first"])
def test_help_reads_the_file_params_names(order, monkeypatch, capsys):
    """`pipeline train --params pipelines/deliver/params.yaml --help` shows that file's
    values and names it, as a run with it would use them (issue 37, item 5)."""
    from pipeline.cli import main

    monkeypatch.chdir(ROOT)
    recipe = "pipelines/deliver/params.yaml"
    wanted = yaml.safe_load((ROOT / recipe).read_text())
    for command in COMMANDS:
        args = ["--params", recipe, "--help"] if order == "params first" else \
            ["--help", f"--params={recipe}"]
        with pytest.raises(SystemExit) as done:
            main([command, *args])
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # help wraps lines
        if command == "train":
            assert f"[default: {wanted['train']['lr']} ({recipe}: train.lr)]" in text
            assert f"[default: {wanted['student']['backbone']} ({recipe}: " \
                   "student.backbone)]" in text
            assert f"({recipe}: train.crop)" in text and "params.yaml: train" not in \
                text.replace(recipe, "")
        elif command == "evaluate":
            assert f"[default: {wanted['eval']['protocol']} ({recipe}: eval.protocol)]" in text
        else:
            assert f"[default: {wanted['teacher']['root']} ({recipe}: teacher.root)]" in text
        assert f"[default: {wanted['dataset']['root']} ({recipe}: dataset.root)]" in text \
            or command == "evaluate"


def test_help_with_a_missing_params_file_says_so(monkeypatch, capsys):
    from pipeline.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        main(["train", "--params", "nope.yaml", "--help"])
    assert done.value.code == 1
    assert capsys.readouterr().err.strip() == \
        "error: parameters file nope.yaml does not exist"
