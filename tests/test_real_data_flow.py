"""The README's real-data path, end to end, on a DELIVER-layout fixture and a
LanguageBind-format teacher that has only Image and Depth towers (as the real downloads):
stage one exactly as the README prints it, the DELIVER preset pipeline with a tiny recipe,
one experiment, and the evaluation of every setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import ROOT, clone_project, copy_project
from tests.tiny_run import TINY_BACKBONE

pytestmark = pytest.mark.slow

STAGE_ONE = "pipeline cache-teacher --dataset deliver --root data/DELIVER --teacher-root weights"
REPRO = "dvc repro pipelines/deliver/dvc.yaml"
EXPERIMENT = ("dvc exp run pipelines/deliver/dvc.yaml -S "
              "pipelines/deliver/params.yaml:train.loss.w_cr=0")
# the README's Table 5 ablation on the preset, cut to one row and one seed (click takes
# the last --seeds) and a params-file-named -S
README_ABLATE = "pipeline ablate table5 --seeds 3 --pipeline pipelines/deliver/dvc.yaml"
ABLATE = f"{README_ABLATE} --rows no-Lcr --seeds 1 -S pipelines/deliver/params.yaml:eval.examples=1"
EVALUATE = ("pipeline evaluate --checkpoint runs/deliver/best.pt --params "
            "pipelines/deliver/params.yaml --root data/DELIVER --setting all "
            "--out metrics/deliver-all")
TINY = {"student": {"backbone": TINY_BACKBONE, "pretrained": None, "embed_dim": 16},
        "train": {"epochs": None, "steps": 2, "batch_size": 2, "crop": 32, "workers": 0,
                  "val_every": 0, "val_limit": 1, "val_protocol": "native",
                  "checkpoint_every": 2},
        "eval": {"protocol": "native", "examples": 1},
        # the preset's CodeAlign stages (`dvc repro` runs them too) at 2 steps each
        "codealign": {"stage0_steps": 2, "stage1_steps": 2, "stage2_steps": 2, "batch_size": 2,
                      "crop": 32, "checkpoint_every": 2, "translator_dim": 8,
                      "translator_blocks": 1, "aligner_blocks": 1}}
CODEALIGN = {"codealign_stage0", "codealign_stage1", "codealign_stage2", "codealign_evaluate"}


def sh(repo, command):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    result = subprocess.run(command, shell=True, cwd=repo, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n" \
                                   f"{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output):
    return {line.split("'")[1].rsplit(":", 1)[-1] for line in output.splitlines()
            if line.startswith("Running stage")}


@pytest.fixture(scope="module")
def deliver_project(tmp_path_factory):
    """The project with the DELIVER preset's pipeline at the tiny recipe, a DELIVER-layout
    data set in data/DELIVER and the random default teacher in weights/, committed to git
    (nothing run); built once per module, cloned by each test."""
    from stages.teacher.default.folders import write_default_teacher
    from tests import layouts

    repo = tmp_path_factory.mktemp("deliver") / "project"
    copy_project(repo, "pipelines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layouts, "H", 48)  # large enough for the student's stride-32 stages at
        mp.setattr(layouts, "W", 64)  # native size (the evaluation below)
        layouts.write_deliver(repo / "data" / "DELIVER")
    write_default_teacher(repo / "weights")  # LanguageBind_Image and _Depth, nothing else
    params = repo / "pipelines" / "deliver" / "params.yaml"
    recipe = yaml.safe_load(params.read_text())
    for group, values in TINY.items():
        recipe[group].update(values)
    params.write_text(yaml.safe_dump(recipe, sort_keys=False))
    sh(repo, "git init -q && git add -A && git commit -qm project")
    return repo


def test_readme_real_data_flow(deliver_project, tmp_path):
    readme = (ROOT / "README.md").read_text()
    for command in (STAGE_ONE, REPRO, EXPERIMENT, EVALUATE, README_ABLATE):
        assert command in readme, command  # the test runs what the README prints
    repo = clone_project(deliver_project, tmp_path / "project")
    assert sorted(p.name for p in (repo / "weights").iterdir() if p.is_dir()) == \
        ["LanguageBind_Depth", "LanguageBind_Image"]

    out = sh(repo, STAGE_ONE)
    assert "event -> image: no LanguageBind_Event under weights" in out
    assert "computed 12 of 12 rows" in out
    out = sh(repo, REPRO)
    # no sample / teacher stage
    assert ran(out) == {"cache_teacher", "train", "evaluate"} | CODEALIGN
    assert "cache/deliver.zarr is complete (12 rows, inputs unchanged)" in out  # reused
    report = (repo / "metrics" / "deliver" / "report.md").read_text()
    assert "Checkpoint `runs/deliver/best.pt`" in report and "step 2" in report
    assert "4 of 4 frames scored" in report
    sh(repo, "git add -A && git commit -qm lock")
    store = repo / "cache" / "deliver.zarr" / "zarr.json"
    before = store.stat().st_mtime_ns
    own_metrics = (repo / "metrics" / "deliver" / "mss.json").read_bytes()
    # `pipeline ablate` on the preset, dvc.lock committed, the data and weights inside the
    # repository as the README lays them out: the plan's keys and the -S naming the preset's
    # params file resolve, and since `dvc exp run --temp`'s copy would lack data/DELIVER and
    # weights/ (in neither git nor DVC), each run works in a linked workspace and its
    # experiment is fetched into the repository (runs in --temp copies: test_ablate.py)
    out = sh(repo, ABLATE)
    assert "data/DELIVER, weights: in the repository but neither in git nor a DVC output, " \
           "so each job runs in a linked workspace" in out
    assert "2 runs, 0 finished, 2 to run" in out
    refs = sh(repo, "git for-each-ref --format='%(refname:lstrip=-1) %(objectname)' "
                    "refs/exps/").split()
    runs = dict(zip(refs[::2], refs[1::2], strict=True))
    assert sorted(runs) == ["table5-full-s3407", "table5-no-Lcr-s3407"]
    for name, commit in runs.items():
        log = (repo / "ablations" / "table5" / "logs" / f"{name}.log").read_text()
        # stage one up to date through the links; the full row is the committed dvc.lock's
        # own params, so DVC restores its outputs from the shared cache instead of training
        assert ran(log) == ({"train", "evaluate"} if "no-Lcr" in name else set()), log
        assert "Stage 'pipelines/deliver/dvc.yaml:cache_teacher' didn't change" in log
        lock = yaml.safe_load(sh(repo, f"git show {commit}:pipelines/deliver/dvc.lock"))
        best = next(o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("best.pt"))
        md5 = best["md5"]  # the run's checkpoint is in the repository's own DVC cache
        assert (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
        recorded = yaml.safe_load(sh(repo, f"git show {commit}:pipelines/deliver/params.yaml"))
        assert recorded["train"]["loss"]["w_cr"] == (0.0 if "no-Lcr" in name else 1.0)
    assert "| no-Lcr |" in (repo / "ablations" / "table5" / "report.md").read_text()
    assert store.stat().st_mtime_ns == before
    assert (repo / "metrics" / "deliver" / "mss.json").read_bytes() == own_metrics
    assert "2 runs, 2 finished, 0 to run" in sh(repo, ABLATE)  # a rerun repeats nothing
    out = sh(repo, EXPERIMENT)
    assert ran(out) == {"train", "evaluate"}
    assert store.stat().st_mtime_ns == before
    out = sh(repo, EVALUATE)
    assert "| miss | mean_mIoU |" in out
    facts = json.loads((repo / "metrics" / "deliver-all" / "provenance.json").read_text())
    assert facts["checkpoint"]["path"] == "runs/deliver/best.pt"
    assert len(facts["checkpoint"]["sha256"]) == 12
    assert (facts["frames_scored"], facts["frames_in_split"]) == (4, 4)
    assert facts["sensor_groups"]["fog"] == 4 and facts["sensor_groups"]["lidarjitter"] == 2
    assert facts["inputs"] == {"depth": "HHA"}  # predictions.png titles its depth column so
    assert (repo / "metrics" / "deliver-all" / "plots" / "sensor.png").is_file()
