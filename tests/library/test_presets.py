"""Presets: shipped in the wheel, never silently empty; the real-data pipelines' params
files (one file per recipe) complete and run by their own stages."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from any2seg import config
from any2seg.errors import PipelineError

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.relative_to(ROOT / "configs").as_posix()
                 for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("name", ["deliver", "mcubes"])
def test_the_recipe_pipelines_read_their_own_complete_params(name):
    """pipelines/NAME/params.yaml, the one recipe file, is what `dvc repro
    pipelines/NAME/dvc.yaml` runs (every stage reads it) and what `pipeline train --params`
    reads; its digest is checked in tests/application/test_ablation_recipes.py."""
    from any2seg import datasets
    from stages.student.codealign.config import CodeAlignConfig
    from stages.student.config import TrainConfig
    from stages.teacher.run import TeacherConfig

    pipeline_params = yaml.safe_load((ROOT / "pipelines" / name / "params.yaml").read_text())
    assert pipeline_params["dataset"]["name"] == name
    assert pipeline_params["teacher"]["modality_branch"] == "auto"
    TrainConfig.from_params(pipeline_params, {})
    TeacherConfig.from_params(pipeline_params, {})
    stages = yaml.safe_load((ROOT / "pipelines" / name / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"cache_teacher", "train", "evaluate", "codealign_stage0",
                           "codealign_stage1", "codealign_stage2", "codealign_evaluate"}
    CodeAlignConfig.from_params(pipeline_params).validate(
        modalities=list(datasets.get(name).modalities))
    for stage in stages.values():
        assert stage["wdir"] == "../.."  # paths in params.yaml are the project root's
        assert f"--params pipelines/{name}/params.yaml" in stage["cmd"]
        (listed,) = stage["params"]
        assert list(listed) == [f"pipelines/{name}/params.yaml"]


def test_mcubes_trains_with_the_deliver_recipe():
    """Its header says the teacher, student, optimiser, schedule and evaluation are
    DELIVER's: only the data (and CodeAlign's modality groups) may differ."""
    deliver, mcubes = (yaml.safe_load((ROOT / "pipelines" / n / "params.yaml").read_text())
                       for n in ("deliver", "mcubes"))
    assert set(mcubes) == set(deliver)
    assert {k: v for k, v in mcubes["codealign"].items() if k != "groups"} == \
        {k: v for k, v in deliver["codealign"].items() if k != "groups"}
    for group in ("teacher", "student", "train", "eval"):
        assert mcubes[group] == deliver[group], group
    assert {k: v for k, v in mcubes["dataset"].items() if k not in ("name", "root")} == \
        {k: v for k, v in deliver["dataset"].items() if k not in ("name", "root")}


def test_a_missing_preset_is_an_error_naming_what_there_is(tmp_path, monkeypatch):
    with pytest.raises(PipelineError, match=r"no preset .*datasets/delivr\.yaml; datasets "
                                            r"presets: deliver, mcubes, sample"):
        config.preset("datasets", "delivr")
    monkeypatch.setenv("ANY2SEG_CONFIGS", str(tmp_path / "nowhere"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "__file__", str(tmp_path / "pkg" / "config.py"))
    with pytest.raises(PipelineError, match="no presets folder"):
        config.preset("datasets", "deliver")


def test_the_wheel_ships_the_presets_and_an_install_reads_them(tmp_path):
    """Built without network (no build isolation, no dependencies), installed into a
    folder of its own, and run from a folder without configs/: the presets still load."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("ANY2SEG_CONFIGS", None)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")], check=True,
                   env=env, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"any2seg/configs/{p}" for p in PRESETS} <= names, sorted(names)
    assert "any2seg/config.py" in names and "stages/student/train.py" in names
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, env=env,
                   capture_output=True)
    env["PYTHONPATH"] = str(tmp_path / "site")  # the install, never this checkout
    run = tmp_path / "elsewhere"
    run.mkdir()
    probe = ("import any2seg.config as c; p = c.preset('datasets', 'deliver'); "
             "print(c.__file__); print(c.configs_dir()); print(p['depth_source'])")
    out = subprocess.run([sys.executable, "-c", probe], check=True, env=env, cwd=run,
                         capture_output=True, text=True).stdout.split()
    assert out[0].startswith(str(tmp_path / "site"))
    assert out[1] == str(tmp_path / "site" / "any2seg" / "configs")
    assert out[2] == "hha"


def test_read_params_refuses_a_named_file_that_is_missing(tmp_path, monkeypatch):
    """`--params` of every command: a named file must exist; none given reads
    ./params.yaml when present, else nothing."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"parameters file nope\.yaml does not exist"):
        config.read_params(Path("nope.yaml"))
    assert config.read_params(None) == ({}, "params.yaml")
    (tmp_path / "p.yaml").write_text("train: {steps: 3}\n")
    assert config.read_params(Path("p.yaml")) == ({"train": {"steps": 3}}, "p.yaml")
