"""The README's real-data block, end to end: every line but the downloads, read from the
README and run verbatim and in its order, on a DELIVER-layout fixture, a LanguageBind-format
teacher that has only Image and Depth towers (as the real downloads) and fixture MiT-B0
weights, with the preset's recipe cut to a few steps and the fixture's Table 5 plan to two
rows; then the workspace is as the README says: the evaluation scored the recipe's model,
the ablation left the workspace alone, and only the last line (the experiment in the
workspace) changed params and runs/."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.dvc_project import command_env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = {"student": {"embed_dim": 16},
        "train": {"epochs": None, "steps": 1, "batch_size": 2, "crop": 32, "workers": 0,
                  "val_every": 0, "val_limit": 1, "val_protocol": "native",
                  "checkpoint_every": 1},
        "eval": {"protocol": "native", "examples": 1}}


def readme_block():
    """The bash block of the README's real-data section, line by line."""
    text = (ROOT / "README.md").read_text().split("## Real data", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def sh(repo, command, timeout=600):
    result = subprocess.run(command, shell=True, cwd=repo, env=command_env(),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n" \
                                   f"{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran(output):
    return {line.split("'")[1].rsplit(":", 1)[-1] for line in output.splitlines()
            if line.startswith("Running stage")}


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_readme_real_data_flow(tmp_path, monkeypatch):
    from stages.teacher.default.folders import write_default_teacher
    from tests import layouts
    from tests.e2e.test_dvc import copy_project
    from tests.student.test_encoder import write_mit

    monkeypatch.setattr(layouts, "H", 48)  # large enough for MiT's stride-32 stages at
    monkeypatch.setattr(layouts, "W", 64)  # native size (the evaluation below)

    lines = readme_block()
    downloads = [line for line in lines if line.startswith("hf download ")]
    commands = lines[len(downloads):]
    assert downloads and not any(c.startswith(("hf ", "huggingface-cli")) for c in commands)
    kinds = [c.split()[0] + " " + c.split()[1] for c in commands]
    assert kinds == ["pipeline cache-teacher", "dvc repro", "pipeline evaluate",
                     "pipeline ablate", "pipeline ablate", "dvc exp"], kinds
    repo = tmp_path / "project"
    copy_project(repo, "pipelines")
    layouts.write_deliver(repo / "data" / "DELIVER")
    write_default_teacher(repo / "weights")  # LanguageBind_Image and _Depth, nothing else
    # what the downloads leave: the MiT folders (the preset's B2, the ablation recipe's B0)
    for line in downloads:
        folder = line.split("--local-dir ")[1].strip()
        if "nvidia/mit-" in line:
            write_mit(repo / folder, line.split("nvidia/mit-")[1].split()[0])
        else:
            assert (repo / folder).is_dir(), line
    params = repo / "pipelines" / "deliver" / "params.yaml"
    recipe = yaml.safe_load(params.read_text())
    for group, values in TINY.items():
        recipe[group].update(values)
    params.write_text(yaml.safe_dump(recipe, sort_keys=False))
    # the command lines stay verbatim; the fixture's Table 5 plan keeps its baseline and its
    # last row (2 rows x 3 seeds = 6 runs, not 21: what runs per row is the same)
    plan_path = repo / "configs" / "ablations" / "table5.yaml"
    plan = yaml.safe_load(plan_path.read_text())
    plan["rows"] = {k: v for k, v in plan["rows"].items() if k in ("base", "all")}
    plan["reference"]["values"] = {k: v for k, v in plan["reference"]["values"].items()
                                   if k in plan["rows"]}
    # and its recipe's head at the tiny width of the workspace's (768 -> 16): the same code
    # runs, and each of the 6 runs saves and hashes a checkpoint a quarter the size
    recipe_params = plan["recipe"]["pipelines/deliver/dvc.yaml"]["params"]
    recipe_params["student.embed_dim"] = TINY["student"]["embed_dim"]
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    sh(repo, "git init -q && git add -A && git commit -qm project")  # the user's clone

    stage_one, repro, evaluate, dry, ablate, experiment = commands
    out = sh(repo, stage_one)
    assert "event -> image: no LanguageBind_Event under weights" in out
    assert "computed 12 of 12 rows" in out
    out = sh(repo, repro)
    assert ran(out) == {"cache_teacher", "train", "evaluate"}  # no sample / teacher stage
    assert "cache/deliver.zarr is complete (12 rows, inputs unchanged)" in out  # reused
    report = (repo / "metrics" / "deliver" / "report.md").read_text()
    assert "Checkpoint `runs/deliver/best.pt`" in report and "step 1" in report
    recipe_model = sha(repo / "runs" / "deliver" / "best.pt")
    store = repo / "cache" / "deliver.zarr" / "zarr.json"
    before = store.stat().st_mtime_ns
    own_metrics = (repo / "metrics" / "deliver" / "mss.json").read_bytes()
    params_before = params.read_bytes()

    out = sh(repo, evaluate)  # the recipe's model, all settings
    assert "| miss | mean_mIoU |" in out
    facts = json.loads((repo / "metrics" / "deliver-all" / "provenance.json").read_text())
    assert facts["checkpoint"]["path"] == "runs/deliver/best.pt"
    assert facts["checkpoint"]["sha256"] == recipe_model[:12]
    assert (facts["frames_scored"], facts["frames_in_split"]) == (4, 4)
    assert facts["sensor_groups"]["fog"] == 4 and facts["sensor_groups"]["lidarjitter"] == 2
    assert facts["inputs"] == {"depth": "HHA"}  # predictions.png titles its depth column so
    assert (repo / "metrics" / "deliver-all" / "plots" / "sensor.png").is_file()

    out = sh(repo, dry)
    assert "2 rows x 3 seeds (train.seed 3407, 3408, 3409) = 6 runs, 0 finished, 6 to " \
        "start" in out and "student.backbone=mit_b0" in out, out
    assert "stage one (cache_teacher): recorded in pipelines/deliver/dvc.lock" in out

    # the ablation on the preset, dvc.lock uncommitted, the data and weights inside the
    # repository as the README lays them out: since `dvc exp run --temp`'s copy would lack
    # data/DELIVER and weights/ (in neither git nor DVC), each run works in a linked
    # workspace and its experiment is fetched into the repository (--temp: test_ablate.py)
    out = sh(repo, ablate, timeout=3600)
    assert "data/DELIVER, weights: in the repository but neither in git nor a DVC output, " \
           "so each job runs in a linked workspace" in out
    assert "6 runs, 0 finished, 6 to run" in out
    refs = sh(repo, "git for-each-ref --format='%(refname:lstrip=-1) %(objectname)' "
                    "refs/exps/").split()
    runs = dict(zip(refs[::2], refs[1::2], strict=True))
    assert len(runs) == 6 and "table5-base-s3407" in runs and "table5-all-s3409" in runs
    for name in ("table5-base-s3407", "table5-all-s3407"):
        log = (repo / "ablations" / "table5" / "logs" / f"{name}.log").read_text()
        assert ran(log) == {"train", "evaluate"}, log
        assert "Stage 'pipelines/deliver/dvc.yaml:cache_teacher' didn't change" in log
        lock = yaml.safe_load(sh(repo, f"git show {runs[name]}:pipelines/deliver/dvc.lock"))
        best = next(o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("best.pt"))
        md5 = best["md5"]  # the run's checkpoint is in the repository's own DVC cache
        assert (repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
        recorded = yaml.safe_load(sh(repo, f"git show {runs[name]}:pipelines/deliver/"
                                           "params.yaml"))
        # the paper's recipe on top of the workspace's (untouched) params
        assert recorded["student"]["backbone"] == "mit_b0"
        assert recorded["student"]["embed_dim"] == 16  # the recipe's, as the fixture cut it
        assert recorded["student"]["pretrained"] == "weights/mit-b0"
        assert recorded["train"]["modalities"] == ["rgb", "depth"]
        loss = recorded["train"]["loss"]
        assert (loss["w_base"], loss["w_sup"], loss["w_cr"], loss["w_se"]) == \
            ((1.0, 0.0, 0.0, 0.0) if "base" in name else (1.0, 1.0, 1.0, 1.0))
    md = (repo / "ablations" / "table5" / "report.md").read_text()
    assert "| all |" in md and "(n=3)" in md
    # the preset cut to a few steps is not the paper's setting: no published figures
    assert "paper (reference values): not shown: not the paper's setting" in md
    assert store.stat().st_mtime_ns == before
    assert (repo / "metrics" / "deliver" / "mss.json").read_bytes() == own_metrics
    assert sha(repo / "runs" / "deliver" / "best.pt") == recipe_model
    assert params.read_bytes() == params_before

    out = sh(repo, experiment)  # last: in the workspace
    assert ran(out) == {"train", "evaluate"}
    assert store.stat().st_mtime_ns == before
    # as the README says: w_cr 0 in the params and its model in runs/deliver/
    assert yaml.safe_load(params.read_text())["train"]["loss"]["w_cr"] == 0
    assert sha(repo / "runs" / "deliver" / "best.pt") != recipe_model
