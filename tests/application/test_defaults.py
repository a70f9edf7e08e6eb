"""One home per default: the config dataclasses hold every built-in default; params.yaml
(the sample's DVC parameters, every key written out so that `dvc exp run -S` can set it)
must state exactly those values, and the folders the embedded default writes are named
once in the code and checked everywhere else they are spelled out."""

import math
import re
from pathlib import Path

import pytest
import yaml

from pipeline.help_defaults import GROUPS, dataclass_default

ROOT = Path(__file__).resolve().parents[2]
# params.yaml keys whose dataclass default is deliberately not params.yaml's value
DIFFERENT = {
    "train.steps": None,  # a run states its length (steps or epochs); params.yaml runs 350
    "dataset.root": None,  # None: configs/datasets/NAME.yaml's root (checked below)
}


def same(a, b) -> bool:
    """Equal, floats to 1e-9 relative (a YAML literal written to 10 digits, such as
    0.3333333333, is the dataclass's 1 / 3)."""
    if isinstance(a, float | int) and isinstance(b, float | int) and \
            not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def drift(params: dict, prefix: str = "") -> list[str]:
    """Every leaf of `params` whose value is not the built-in default of its key, as
    'key: params X, dataclass Y' (nested groups with a dataclass of their own recursed)."""
    found = []
    for name, value in params.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(value, dict) and key in GROUPS:
            found += drift(value, key)
            continue
        default = dataclass_default(key)
        if key in DIFFERENT:
            if default != DIFFERENT[key]:
                found.append(f"{key}: dataclass {default!r}, expected {DIFFERENT[key]!r}")
        elif not same(value, default):
            found.append(f"{key}: params.yaml {value!r}, dataclass {default!r}")
    return found


def test_params_yaml_states_the_built_in_defaults():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert drift(params) == [], "change a default in its dataclass and in params.yaml"


def test_a_default_changed_in_one_place_only_is_caught(monkeypatch):
    """The check can fail: params.yaml moved alone, or the dataclass moved alone."""
    import dataclasses

    from stages.student.config import TrainConfig

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["lr"] = 0.5
    params["train"]["loss"]["tau_se"] = 0.7
    assert drift(params) == ["train.lr: params.yaml 0.5, dataclass 0.001",
                             "train.loss.tau_se: params.yaml 0.7, dataclass 0.1"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    monkeypatch.setattr(fields["crop"], "default", 512)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert drift(params) == ["train.crop: params.yaml 128, dataclass 512"]


def test_every_key_of_params_yaml_has_a_dataclass_field():
    """`dataclass_default` raises for a key no dataclass holds: a params.yaml key the code
    does not read would be a default with no home."""
    with pytest.raises(KeyError):
        dataclass_default("train.no_such_key")
    with pytest.raises(KeyError, match="no config dataclass"):
        dataclass_default("nowhere.key")


def test_the_dataset_name_has_one_default():
    from any2seg.config import DEFAULT_DATASET
    from stages.student.config import TrainConfig
    from stages.teacher.config import TeacherConfig

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert TrainConfig().dataset == TeacherConfig().dataset == DEFAULT_DATASET == \
        params["dataset"]["name"]


def fit_teacher_default(option: str) -> str:
    """The default of one `pipeline fit-teacher` option, as --help shows it."""
    import click

    from pipeline.cli import cli

    fit = cli.commands["fit-teacher"]
    (param,) = [p for p in fit.params if p.name == option]
    return param.get_default(click.Context(fit)).as_posix()


def test_the_sample_folder_has_one_home():
    """configs/datasets/sample.yaml's root (what every reader resolves) is the folder
    params.yaml, `fit-teacher --root`, dvc.yaml and the Makefile name."""

    from any2seg.config import dataset_root

    home = dataset_root("sample", None).as_posix()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["dataset"]["root"] == home
    assert fit_teacher_default("root") == home
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["sample"]["outs"] == [home]
    assert f"--root {home} " in stages["teacher"]["cmd"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^SAMPLE \?= (.*)$", makefile, re.M)[1] == home


def test_the_default_teacher_folder_has_one_home():
    """stages.teacher.default.FOLDER is where fit-teacher writes and teacher.root's
    default; params.yaml, dvc.yaml and the Makefile's clean-demo spell the same folder."""

    from stages.teacher.config import TeacherConfig
    from stages.teacher.default import FOLDER

    assert TeacherConfig().teacher_root == FOLDER
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["teacher"]["root"] == FOLDER
    assert fit_teacher_default("out") == FOLDER
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["teacher"]["outs"] == [FOLDER]
    clean = re.search(r"^clean-demo:\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M)[1]
    assert FOLDER in clean.split()
