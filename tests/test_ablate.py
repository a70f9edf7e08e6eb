"""`pipeline ablate`: plans, the paired-t statistics, and 2 rows x 2 seeds of DVC experiments
on a tiny pipeline (killed after its first run, then rerun)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.ablation_stats import paired, t_quantile
from pipeline.cli import main
from tests.test_dvc import ROOT, copy_project, edit_params, run

# 97.5 % quantiles of Student's t, solved at 40 digits with mpmath's regularised incomplete
# beta (P(|T| > t) = I_{v/(v+t^2)}(v/2, 1/2)); df 1 is tan(0.475 pi) as well
T975 = {1: 12.706204736174704646, 2: 4.3026527297494638523, 4: 2.7764451051977943578,
        9: 2.2621571627982055426, 30: 2.04227245630123831}


@pytest.mark.parametrize("df", T975)
def test_t_quantile_is_exact(df):
    assert t_quantile(0.95, df) == pytest.approx(T975[df], rel=1e-12)


def test_paired_interval_and_verdicts():
    base = [50.0, 52.0, 51.0]
    # diffs 1.0, 1.2, 0.8: mean 1.0, sd 0.2, half width t(0.975, 2) * 0.2 / sqrt(3)
    d = paired([51.0, 53.2, 51.8], base)
    half = T975[2] * 0.2 / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(1.0) and d.std == pytest.approx(0.2)
    assert (d.low, d.high) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert d.verdict == "better"
    assert paired([49.0, 51.2, 50.2], base).verdict == "worse"
    assert paired([52.0, 51.0, 51.5], base).verdict == "inside the noise"  # +1, -1, +0.5
    assert paired([60.0], [50.0]).verdict == "inside the noise"  # one seed: no interval


def cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


@pytest.fixture
def project(tmp_path, monkeypatch):
    """dvc.yaml, params.yaml and configs/ in a git repository (nothing run)."""
    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_plan(project, name, data):
    path = project / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False) if isinstance(data, dict) else data)
    return str(path)


BAD_PLANS = {
    "unknown key": ({"baseline": "full", "rows": {"full": {}, "x": {"train.loss.w_xx": 0}}},
                    "unknown parameter 'train.loss.w_xx'"),
    "duplicates the baseline": ({"baseline": "full", "rows": {"full": {}, "same": {}}},
                                "row 'same' changes nothing"),
    "sets the default value": ({"baseline": "full", "rows": {
        "full": {}, "same": {"train.loss.w_cr": 1.0}}}, "duplicates the baseline 'full'"),
    "empty plan": ("description: nothing\n", "the plan has no rows"),
    "comma in a row name": ({"baseline": "full", "rows": {"full": {}, "a,b": {
        "train.loss.w_cr": 0}}}, "row name 'a,b' must be letters, digits"),
    "no baseline": ({"rows": {"full": {}, "x": {"train.loss.w_cr": 0}}},
                    "baseline must name one of the rows"),
    "a stage-one key": ({"baseline": "full", "rows": {"full": {}, "x": {"teacher.dtype":
                                                                        "float32"}}},
                        "'teacher.dtype' cannot be ablated (stage 'cache_teacher' reads it)"),
    "a seed in a row": ({"baseline": "full", "rows": {"full": {}, "x": {"train.seed": 1}}},
                        "row 'x' sets train.seed; the seeds come from --seeds"),
    "value out of range": ({"baseline": "full", "rows": {"full": {}, "x": {"train.crop": 7}}},
                           "row 'x': params.yaml: train.crop must be an integer >= 29"),
}


@pytest.mark.parametrize("plan, message", BAD_PLANS.values(), ids=BAD_PLANS)
def test_bad_plans_fail_in_one_line(project, capsys, plan, message):
    code, out = cli(capsys, "ablate", write_plan(project, "p", plan), "--seeds", "2")
    assert code == 1 and message in out and out.count("\n") == 1, out


def test_bad_options_fail_in_one_line(project, capsys):
    for args, message in ((["table5", "--seeds", "0"], "--seeds must be an integer >= 1"),
                          (["table5", "--rows", "nope"], "has no row 'nope'"),
                          (["table5", "--metric", "mss"], "--metric expects FILE.KEY"),
                          (["table5", "-S", "train.loss.w_cr=0"], "-S train.loss.w_cr "
                           "conflicts with row 'no-Lcr'"),
                          (["nope"], "no ablation plan 'nope'; shipped plans: mff_variants")):
        code, out = cli(capsys, "ablate", *args)
        assert code == 1 and message in out and out.count("\n") == 1, (args, out)


def test_ablate_needs_a_recorded_stage_one(project, capsys):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x",
                    "--allow-empty"], cwd=project, check=True)
    code, out = cli(capsys, "ablate", "table5", "--seeds", "1")
    assert code == 1 and "ablate needs the teacher cache recorded in dvc.lock: run `dvc " \
        "repro` once" in out and out.count("\n") == 1, out


# ---------------------------------------------------------------------------------------
# end to end: 2 rows x 2 seeds as DVC experiments
# ---------------------------------------------------------------------------------------
TINY = ("-S", "train.steps=2", "-S", "eval.limit=1")


@pytest.fixture(scope="session")
def ablated(tmp_path_factory):
    """A tiny pipeline whose stage one ran (dvc.lock left uncommitted, as after `make demo`),
    then `pipeline ablate table5 --rows ce-only --seeds 2` killed after its first run and
    rerun. Returns (repo, outputs of both ablate calls, the workspace before)."""

    repo = tmp_path_factory.mktemp("ablate") / "project"
    copy_project(repo)
    edit_params(repo, dataset__sample__size=64, dataset__sample__train=8,
                dataset__sample__val=4, dataset__sample__test=2,
                dataset__sample__frames_per_scene=2, train__steps=3, train__batch_size=2,
                train__crop=64, train__workers=0, train__val_limit=1,
                train__checkpoint_every=3, train__val_every=0, student__embed_dim=16,
                eval__limit=2, eval__examples=1, eval__setting="all",
                teacher__rows_per_shard=8, teacher__fit__hidden=16, teacher__fit__layers=1,
                teacher__fit__projection=16, teacher__fit__image_size=32,
                teacher__fit__image_epochs=1, teacher__fit__branch_epochs=1)
    run(repo, "git", "init", "-q")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "tiny pipeline")
    run(repo, "dvc", "repro", "cache_teacher")  # stage one only: the runs train the rest
    before = {}
    for rel in ("metrics/mss.json", "metrics/report.md", "runs/sample/best.pt"):
        path = repo / rel  # the workspace's own results: no run may overwrite them
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the workspace's own " + rel.encode())
        before[path] = path.read_bytes()
    store = repo / "cache" / "sample.zarr" / "zarr.json"
    mtime = store.stat().st_mtime_ns
    cmd = [sys.executable, "-m", "pipeline", "ablate", "table5", "--rows", "ce-only",
           "--seeds", "2", *TINY]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first = []
    for line in proc.stdout:
        first.append(line)
        if line.startswith("finished "):
            os.killpg(proc.pid, signal.SIGKILL)  # ablate and the dvc run it started
            break
    proc.wait()
    second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"repo": repo, "first": "".join(first), "second": second.stdout, "before": before,
            "store": store, "mtime": mtime, "env": env, "cmd": cmd}


pytest_slow = pytest.mark.slow


def exp_metrics(repo):
    """{experiment name: {"mss.mIoU": ..., ...}} as `dvc exp show --json` reports them."""
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    out = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                files = {Path(f).stem: v.get("data", {})
                         for f, v in (data.get("metrics") or {}).items()}
                out[rev["name"]] = {f"{stem}.{key}": files.get(stem, {}).get(key)
                                    for stem, key in (("mss", "mIoU"), ("miss", "mean_mIoU"),
                                                      ("sensor", "mean_of_groups_mIoU"))}
    return out


@pytest_slow
def test_a_killed_ablate_reruns_only_the_missing_runs(ablated):
    assert "4 runs, 0 finished, 4 to run" in ablated["first"]
    assert "4 runs, 1 finished, 3 to run" in ablated["second"], ablated["second"]
    assert ablated["second"].count("finished table5-") == 3
    names = {f"table5-{row}-s{seed}" for row in ("full", "ce-only") for seed in (3407, 3408)}
    assert names <= set(exp_metrics(ablated["repo"]))


@pytest_slow
def test_stage_one_never_reruns_and_the_workspace_is_untouched(ablated):
    repo = ablated["repo"]
    assert ablated["store"].stat().st_mtime_ns == ablated["mtime"]
    for path, data in ablated["before"].items():
        assert path.read_bytes() == data, path
    for log in (repo / "ablations" / "table5" / "logs").glob("*.log"):
        text = log.read_text()
        assert "Running stage 'train'" in text or "didn't change" in text
        assert "Running stage 'cache_teacher'" not in text and \
            "Running stage 'teacher'" not in text


@pytest_slow
def test_the_report_equals_the_runs_metrics_and_the_hand_computed_interval(ablated):
    repo = ablated["repo"]
    report = json.loads((repo / "ablations" / "table5" / "report.json").read_text())
    shown = exp_metrics(repo)
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == ["full", "ce-only"] and report["baseline"] == "full"
    assert rows["ce-only"]["overrides"] == {"train.loss.w_cr": 0.0, "train.loss.w_se": 0.0}
    assert report["extra_overrides"] == {"train.steps": 2, "eval.limit": 1}
    assert report["teacher"]["teacher_fingerprint_sha256"]
    for metric in report["metrics"]:
        for row in ("full", "ce-only"):
            m = rows[row]["metrics"][metric]
            values = [shown[f"table5-{row}-s{seed}"][metric] for seed in (3407, 3408)]
            assert m["values"] == values and m["n"] == 2
            assert m["mean"] == pytest.approx(sum(values) / 2)
            assert m["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        base = [shown[f"table5-full-s{s}"][metric] for s in (3407, 3408)]
        mine = [shown[f"table5-ce-only-s{s}"][metric] for s in (3407, 3408)]
        d = [a - b for a, b in zip(mine, base, strict=True)]
        mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
        half = T975[1] * sd / math.sqrt(2)
        diff = rows["ce-only"]["metrics"][metric]["diff"]
        assert diff["mean"] == pytest.approx(mean) and diff["n"] == 2
        assert (diff["low"], diff["high"]) == (pytest.approx(mean - half),
                                               pytest.approx(mean + half))
        verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else \
            "inside the noise"
        assert diff["verdict"] == verdict
    md = (repo / "ablations" / "table5" / "report.md").read_text()
    assert "| full | (baseline) |" in md and "(n=2)" in md and report["commit"][:7] in \
        ablated["second"]
    assert (repo / "ablations" / "table5" / "plot.png").stat().st_size > 0


@pytest_slow
def test_report_rerenders_without_training(ablated):
    repo = ablated["repo"]
    md = (repo / "ablations" / "table5" / "report.md").read_text()
    again = subprocess.run([*ablated["cmd"], "--report"], cwd=repo, env=ablated["env"],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "to run" not in again.stdout
    assert (repo / "ablations" / "table5" / "report.md").read_text() == md


@pytest_slow
def test_the_compact_exp_show_of_the_docs_has_the_baseline_and_headline_metrics(ablated):
    doc = (ROOT / "docs" / "ablations.md").read_text()
    keep = doc.split("dvc exp show --drop '.*' --keep '", 1)[1].split("'", 1)[0]
    csv = run(ablated["repo"], "dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", keep)
    header, *lines = [line.split(",") for line in csv.splitlines() if line.strip()]
    assert {"mIoU", "mean_mIoU", "mean_of_groups_mIoU", "train.loss.w_cr"} <= set(header)
    rows = {line[header.index("Experiment")]: line for line in lines}
    base = rows["table5-full-s3407"]
    assert float(base[header.index("mIoU")]) >= 0 and len(header) < 16
