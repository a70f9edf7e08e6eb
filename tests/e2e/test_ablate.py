"""`pipeline ablate`: plans, the paired-t statistics, and 2 rows x 2 seeds of DVC experiments
on a tiny pipeline (killed after its first run, then rerun)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from any2seg.errors import PipelineError
from pipeline.ablation import run as ablate
from pipeline.ablation.leftovers import BARE_AGE_S, clean_killed_runs
from pipeline.ablation.report import metric_value
from pipeline.ablation.setup import prepare
from pipeline.ablation.stats import paired, t_quantile
from pipeline.cli import main
from tests.dvc_project import ROOT, clone_project, run

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
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")  # a link would leave the repo
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
    # the line and column YAML reported (1-based), not just "while parsing a block mapping"
    "a YAML syntax error": ("baseline: full\nrows:\n  full: {}\n  x: {train.loss.w_cr: 0\n"
                            "  y: {}\n", "p.yaml:5:4: invalid YAML: expected ',' or '}'"),
}


@pytest.mark.parametrize("plan, message", BAD_PLANS.values(), ids=BAD_PLANS)
def test_bad_plans_fail_in_one_line(project, capsys, plan, message):
    code, out = cli(capsys, "ablate", write_plan(project, "p", plan), "--seeds", "2")
    assert code == 1 and message in out and out.count("\n") == 1, out


CODEALIGN_PLAN = {"target": "codealign_evaluate", "metrics": ["codealign.mean.translated"],
                  "seed": "codealign.train_seed", "baseline": "default",
                  "rows": {"default": {}, "k8": {"codealign.codes": 8}}}
BAD_TARGETS = {
    "a key the target does not run": (
        {**CODEALIGN_PLAN, "rows": {"default": {}, "x": {"train.loss.w_cr": 0.0}}},
        "'train.loss.w_cr' cannot be ablated: no stage that 'codealign_evaluate' runs reads it"),
    "a key of the target's frozen inputs": (
        {**CODEALIGN_PLAN, "rows": {"default": {}, "x": {"dataset.sample.size": 32}}},
        "'dataset.sample.size' cannot be ablated (stage 'sample' reads it)"),
    "the seed key in a row": (
        {**CODEALIGN_PLAN, "rows": {"default": {}, "x": {"codealign.train_seed": 1}}},
        "row 'x' sets codealign.train_seed; the seeds come from --seeds"),
    "a seed key the target does not read": (
        {**CODEALIGN_PLAN, "seed": "train.seed"},
        "seed: 'train.seed' cannot be ablated: no stage that 'codealign_evaluate' runs"),
    "no metrics for another target": (
        {k: v for k, v in CODEALIGN_PLAN.items() if k != "metrics"},
        "a plan with target 'codealign_evaluate' must name its metrics"),
    "a metrics file the target does not write": (
        {**CODEALIGN_PLAN, "metrics": ["mss.mIoU"]},
        "metric mss.*: the codealign_evaluate stage of"),
    "an unknown target": ({**CODEALIGN_PLAN, "target": "nope"},
                          "target 'nope': "),
    "a train key in a row when evaluate's seed key is the default": (
        {"target": "evaluate", "baseline": "a", "rows": {"a": {}, "x": {
            "codealign.codes": 8}}},
        "'codealign.codes' cannot be ablated: no stage that 'evaluate' runs reads it"),
}


@pytest.mark.parametrize("plan, message", BAD_TARGETS.values(), ids=BAD_TARGETS)
def test_plan_keys_must_belong_to_the_stages_its_target_runs(project, capsys, plan, message):
    code, out = cli(capsys, "ablate", write_plan(project, "p", plan), "--seeds", "2")
    assert code == 1 and message in out and out.count("\n") == 1, out


SHIPPED = {"table5": ("evaluate", "train.seed", ["mss", "miss", "sensor"]),
           "table6": ("evaluate", "train.seed", ["mss", "miss", "sensor"]),
           "mff_variants": ("evaluate", "train.seed", ["mss", "miss", "sensor"]),
           "codealign": ("codealign_evaluate", "codealign.train_seed", ["codealign"])}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_plan_fits_the_pipeline(project, name):
    """The shipped plans against the root dvc.yaml: student keys are read by the CodeAlign
    chain too, which an evaluate plan does not run (this once rejected table6)."""
    target, seed_key, stems = SHIPPED[name]
    setup = prepare(name, 2, None, [], [], None)
    assert setup.target == target and setup.plan.seed == seed_key
    assert sorted(setup.metric_files) == sorted(stems)
    assert setup.seeds == [3407, 3408] and setup.dag.address(target) == target
    if target == "evaluate":
        assert setup.dag.frozen(target) == ["sample", "teacher", "cache_teacher"]
        assert setup.dag.ablated(target) == ["train", "evaluate"]
    else:
        assert setup.dag.frozen(target) == ["sample"]  # CodeAlign reads no teacher
        assert setup.dag.ablated(target) == ["codealign_stage0", "codealign_stage1",
                                             "codealign_stage2", "codealign_evaluate"]
    for row in setup.rows:
        assert setup.overrides(row, 3408)[seed_key] == 3408


def test_codealign_metrics_read_rows_of_translators():
    rows = [{"pair": "rgb->1", "translated": 4.0, "target own": 6.0},
            {"pair": "event->0", "translated": 5.0, "target own": 7.5}]
    assert metric_value(rows, "mean.translated") == 4.5
    assert metric_value(rows, "event->0.target own") == 7.5
    assert math.isnan(metric_value(rows, "lidar->0.translated"))
    assert metric_value({"mIoU": 50.0, "rgb-depth": 1.0}, "rgb-depth") == 1.0
    assert metric_value({"a": {"b": 2}}, "a.b") == 2.0


def test_the_deliver_preset_resolves_its_own_params(project):
    """`--pipeline pipelines/deliver/dvc.yaml`: keys, values and metrics files come from
    pipelines/deliver/params.yaml (wdir ../.., ${dataset.name} = deliver), -S may name that
    file as `dvc exp run -S` does, and every DVC argument names it (no training here: the
    real run is in tests/e2e/test_real_data_flow.py)."""
    deliver = Path("pipelines/deliver/dvc.yaml")
    setup = prepare("table5", 2, "Lcr", ["pipelines/deliver/params.yaml:train.lr=1e-4",
                                             "eval.limit=4"], [], deliver)
    assert setup.params_path == project / "pipelines" / "deliver" / "params.yaml"
    assert setup.extra == {"train.lr": 0.0001, "eval.limit": 4}
    assert setup.metric_files == {s: f"metrics/deliver/{s}.json"
                                  for s in ("mss", "miss", "sensor")}
    assert setup.dag.frozen("evaluate") == ["cache_teacher"]
    assert setup.dag.stages["cache_teacher"].outs == ("cache/deliver.zarr",)
    assert setup.dag.address("evaluate") == "pipelines/deliver/dvc.yaml:evaluate"
    from pipeline.ablation.run import _set_args

    prefix = "pipelines/deliver/params.yaml:"
    args = _set_args(setup, setup.overrides("Lcr", 3408))
    assert args[1::2] == [f"{prefix}{k}={v}" for k, v in (
        ("train.modalities", '["rgb", "depth"]'), ("train.loss.w_base", "1.0"),
        ("train.loss.w_sup", "0.0"), ("train.loss.w_cr", "1.0"), ("train.loss.w_se", "0.0"),
        ("student.backbone", '"mit_b0"'), ("student.pretrained", '"weights/mit-b0"'),
        ("student.embed_dim", "768"), ("train.lr", "0.0001"), ("eval.limit", "4"),
        ("train.seed", "3408"))] and set(args[::2]) == {"-S"}
    # train.steps is a key of the root params.yaml only (the preset counts epochs)
    with pytest.raises(PipelineError, match="unknown parameter 'train.steps': pipelines/"
                       "deliver/params.yaml has no such key"):
        prepare("table5", 1, None, ["train.steps=2"], [], deliver)
    with pytest.raises(PipelineError, match="-S params.yaml:train.lr=1: params.yaml is not "
                       "the pipeline's params file"):
        prepare("table5", 1, None, ["params.yaml:train.lr=1"], [], deliver)


def test_bad_options_fail_in_one_line(project, capsys):
    for args, message in ((["table5", "--seeds", "0"], "--seeds must be an integer >= 1"),
                          (["table5", "--rows", "nope"], "has no row 'nope'"),
                          (["table5", "--metric", "mss"], "--metric expects FILE.KEY"),
                          (["table5", "-S", "train.loss.w_cr=0"], "-S train.loss.w_cr "
                           "conflicts with row 'Lcr'"),
                          (["nope"], "no ablation plan 'nope'; shipped plans: codealign, "
                           "mff_variants, table5, table6, table7-rgb")):
        code, out = cli(capsys, "ablate", *args)
        assert code == 1 and message in out and out.count("\n") == 1, (args, out)


def test_ablate_needs_a_recorded_stage_one(project, capsys):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x",
                    "--allow-empty"], cwd=project, check=True)
    code, out = cli(capsys, "ablate", "table5", "--seeds", "1")
    assert code == 1 and "ablate needs the teacher cache recorded in dvc.lock: run `dvc " \
        "repro cache_teacher` once" in out and out.count("\n") == 1, out


def test_cleanup_spares_live_runs_and_other_experiments(tmp_path):
    """What a killed run left is removed only when its process is gone; a live run of the
    plan stops ablate; folders of other experiments are never touched."""
    exps, logs = tmp_path / ".dvc" / "tmp" / "exps", tmp_path / "ablations" / "p" / "logs"
    logs.mkdir(parents=True)

    def temp_run(folder, name, status=2):
        (exps / "standalone" / folder / "data").mkdir(parents=True)
        info = exps / "standalone" / "run" / folder / f"{folder}.run"
        info.parent.mkdir(parents=True)
        info.write_text(json.dumps({"name": name, "root_dir": str(exps / "standalone" / folder),
                                    "baseline_rev": "b" * 40, "status": status}))

    def mark(name, pid, started=0.0):
        (logs / f"{name}.pid").write_text(json.dumps({"pid": pid, "baseline": "b" * 40,
                                                      "started": started}))

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "p-b-s1"])
    try:
        temp_run("tmpkilled", "p-a-s1")
        temp_run("tmpother", "not-ours")
        temp_run("tmplive", "p-b-s1")
        mark("p-b-s1", live.pid)
        with pytest.raises(PipelineError, match=f"run p-b-s1 is still running \\(pid "
                           f"{live.pid}, started by an earlier ablate\\)"):
            clean_killed_runs(tmp_path, logs)
        (logs / "p-b-s1.pid").unlink()
        # a run killed before dvc wrote its info file: only a bare git folder, old enough
        bare = exps / "standalone" / "tmpbare"
        (bare / ".git" / "refs" / "heads").mkdir(parents=True)
        old = time.time() - BARE_AGE_S - 5
        os.utime(bare, (old, old))
        mark("p-a-s1", dead.pid)
        mark("p-c-s1", dead.pid, started=old - 10)
        said = []
        assert clean_killed_runs(tmp_path, logs, said.append) == ["p-a-s1", "p-c-s1"]
        assert said == ["removed the leftovers of the killed run p-a-s1 "
                        "(.dvc/tmp/exps/standalone/tmpkilled)",
                        "removed the leftovers of the killed run p-c-s1 "
                        "(.dvc/tmp/exps/standalone/tmpbare)"]
        left = sorted(p.name for p in (exps / "standalone").glob("tmp*"))
        assert left == ["tmplive", "tmpother"] and not list(logs.glob("*.pid"))
        assert (exps / "standalone" / "run" / "tmpother" / "tmpother.run").is_file()
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------------------
# end to end: 2 rows x 2 seeds as DVC experiments
# ---------------------------------------------------------------------------------------
TINY = ("-S", "train.steps=2", "-S", "eval.limit=1")


@pytest.fixture(scope="session")
def ablated(stage_one_project, tmp_path_factory):
    """A tiny pipeline whose stage one ran (dvc.lock left uncommitted, as after `make demo`),
    then `pipeline ablate table5 --rows Lsup --seeds 2` killed after its first run and
    rerun. Returns (repo, outputs of both ablate calls, the workspace before)."""

    source, _ = stage_one_project  # stage one ran (tests/dvc_project.py): the runs train the rest
    repo = clone_project(source, tmp_path_factory.mktemp("ablate") / "project")
    before = {}
    for rel in ("metrics/mss.json", "metrics/report.md", "runs/sample/best.pt"):
        path = repo / rel  # the workspace's own results: no run may overwrite them
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the workspace's own " + rel.encode())
        before[path] = path.read_bytes()
    store = repo / "cache" / "sample.zarr" / "zarr.json"
    mtime = store.stat().st_mtime_ns
    cmd = [sys.executable, "-m", "pipeline", "ablate", "table5", "--rows", "Lsup",
           "--seeds", "2", *TINY]
    env = {"OMP_NUM_THREADS": "1", **os.environ,  # one thread: tests/dvc_project.command_env
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"}  # no git identity: dvc's own
    proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    first, leftover = [], None
    exps = repo / ".dvc" / "tmp" / "exps"
    for line in proc.stdout:
        first.append(line)
        if sum(x.startswith("started ") for x in first) == 2:
            # kill once the second run (it starts when the first has finished) is under way
            # in its temp folder (dvc's info file says running): ablate and its dvc run
            name, deadline = line.split()[1], time.monotonic() + 120
            while leftover is None and time.monotonic() < deadline:
                leftover = next((Path(info["root_dir"]) for info in dvc_infos(exps)
                                 if info["name"] == name and info["status"] == 2), None)
                time.sleep(0.1)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert leftover is not None and leftover.is_dir(), "".join(first)
    # another experiment's temp folder (no marker of this plan; dvc's info file says it
    # failed, so `dvc exp show` lists it as nothing): the rerun must keep it
    foreign = exps / "standalone" / "tmpforeign"
    (foreign / "data").mkdir(parents=True)
    info = exps / "standalone" / "run" / "f00" / "f00.run"
    info.parent.mkdir(parents=True)
    info.write_text(json.dumps({"git_url": f"file://{foreign}", "baseline_rev": "0" * 40,
                                "location": "tempdir", "root_dir": str(foreign),
                                "dvc_dir": ".dvc", "name": "someone-else", "status": 4}))
    # the rerun runs two at once (--jobs 2)
    second = subprocess.run([*cmd, "--jobs", "2"], cwd=repo, env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    return {"repo": repo, "first": "".join(first), "second": second.stdout, "before": before,
            "store": store, "mtime": mtime, "env": env, "cmd": cmd, "leftover": leftover,
            "foreign": foreign}


def dvc_infos(exps):
    """The executor info files dvc keeps under .dvc/tmp/exps (one per temp run)."""
    out = []
    for path in exps.glob("*/run/*/*.run"):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # being written
            continue
    return out


pytest_slow = pytest.mark.slow


def exp_metrics(repo):
    """{experiment name: {"mss.mIoU": ..., ...}} as `dvc exp show --json` reports them (the
    headline metrics and table5's F1 and Acc)."""
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    out = {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev.get("data") or {}
                files = {Path(f).stem: v.get("data", {})
                         for f, v in (data.get("metrics") or {}).items()}
                out[rev["name"]] = {f"{stem}.{key}": files.get(stem, {}).get(key)
                                    for stem, key in (("mss", "mIoU"), ("mss", "mF1"),
                                                      ("mss", "mAcc"), ("miss", "mean_mIoU"),
                                                      ("sensor", "mean_of_groups_mIoU"))}
    return out


@pytest_slow
def test_a_killed_ablate_reruns_only_the_missing_runs(ablated):
    assert "4 runs, 0 finished, 4 to run" in ablated["first"]
    assert "4 runs, 1 finished, 3 to run" in ablated["second"], ablated["second"]
    assert ablated["second"].count("finished table5-") == 3
    # the killed run's temp folder (a checkout with the data and the teacher cache) went;
    # another experiment's stayed
    killed = ablated["first"].splitlines()[-1].split()[1]
    assert f"removed the leftovers of the killed run {killed} (.dvc/tmp/exps/standalone/" \
        in ablated["second"], ablated["second"]
    assert not ablated["leftover"].exists()
    assert [p.name for p in ablated["foreign"].parent.glob("tmp*")] == ["tmpforeign"]
    assert (ablated["foreign"] / "data").is_dir()
    assert not list((ablated["repo"] / "ablations" / "table5" / "logs").glob("*.pid"))
    # --jobs 2: the first two of the three runs started before either finished
    events = [line.split()[0] for line in ablated["second"].splitlines()
              if line.startswith(("started ", "finished "))]
    assert events[:2] == ["started", "started"] and events.count("started") == 3, events
    names = {f"table5-{row}-s{seed}" for row in ("base", "Lsup") for seed in (3407, 3408)}
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
    assert list(rows) == ["base", "Lsup"] and report["baseline"] == "base"
    assert report["plan_file"] == "configs/ablations/table5.yaml"  # as the repository names it
    assert rows["Lsup"]["overrides"] == {"train.loss.w_sup": 1.0}
    assert report["every_row"]["train.loss.w_base"] == 1.0
    assert report["extra_overrides"] == {"train.steps": 2, "eval.limit": 1}
    assert report["teacher"]["teacher_fingerprint_sha256"]
    for metric in report["metrics"]:
        for row in ("base", "Lsup"):
            m = rows[row]["metrics"][metric]
            values = [shown[f"table5-{row}-s{seed}"][metric] for seed in (3407, 3408)]
            assert m["values"] == values and m["n"] == 2
            assert m["mean"] == pytest.approx(sum(values) / 2)
            assert m["std"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
        base = [shown[f"table5-base-s{s}"][metric] for s in (3407, 3408)]
        mine = [shown[f"table5-Lsup-s{s}"][metric] for s in (3407, 3408)]
        d = [a - b for a, b in zip(mine, base, strict=True)]
        mean, sd = sum(d) / 2, abs(d[0] - d[1]) / math.sqrt(2)
        half = T975[1] * sd / math.sqrt(2)
        diff = rows["Lsup"]["metrics"][metric]["diff"]
        assert diff["mean"] == pytest.approx(mean) and diff["n"] == 2
        assert (diff["low"], diff["high"]) == (pytest.approx(mean - half),
                                               pytest.approx(mean + half))
        verdict = "better" if mean - half > 0 else "worse" if mean + half < 0 else \
            "inside the noise"
        assert diff["verdict"] == verdict
    md = (repo / "ablations" / "table5" / "report.md").read_text()
    assert "| base | (baseline) |" in md and "(n=2)" in md and report["commit"][:7] in \
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
    assert {"mIoU", "mean_mIoU", "mean_of_groups_mIoU"} <= set(header)
    assert {c.rpartition(":")[2] for c in header} >= {"train.loss.w_sup", "train.loss.w_base"}
    rows = {line[header.index("Experiment")]: line for line in lines}
    base = rows["table5-base-s3407"]
    assert float(base[header.index("mIoU")]) >= 0 and len(header) < 16


@pytest_slow
def test_a_committed_dvc_lock_works_too(ablated):
    """The same plan after `git add dvc.lock && git commit`: runs of the new commit (the
    old commit's are not its), no `-C dvc.lock` (the commit has it), and a report of the new
    commit's runs. Runs last: it moves HEAD, and puts it back."""
    repo, env = ablated["repo"], ablated["env"]
    before = exp_metrics(repo)  # the first commit's runs
    run(repo, "git", "add", "dvc.lock")
    run(repo, "git", "commit", "-qm", "record stage one")
    try:
        cmd = [*ablated["cmd"][:-len(TINY) - 2], "--seeds", "1", *TINY]
        assert cmd[cmd.index("--seeds") - 1] == "Lsup", cmd
        out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "2 runs, 0 finished, 2 to run" in out.stdout, out.stdout
        logs = repo / "ablations" / "table5" / "logs"
        log = (logs / "table5-Lsup-s3407.log").read_text()
        assert " -C " not in log.splitlines()[0] and "Running stage 'cache_teacher'" not in log
        report = json.loads((repo / "ablations" / "table5" / "report.json").read_text())
        assert report["commit"][:7] != ablated["second"].split("on commit ")[1][:7]
        shown = exp_metrics(repo)  # the new commit's runs
        for row in report["rows"]:
            for metric, m in row["metrics"].items():
                name = f"table5-{row['row']}-s3407"
                # the report is of this commit's runs; they trained again (a persisted
                # train stage has no DVC run cache: docs/dvc.md), so their numbers need
                # not be the first commit's (those ran as two jobs of one thread each)
                assert m["values"] == [shown[name][metric]]
                assert name in before
    finally:
        run(repo, "git", "reset", "-q", "HEAD~1")


def test_no_run_starts_after_a_failure(project, monkeypatch):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x",
                    "--allow-empty"], cwd=project, check=True)
    setup = prepare("table5", 2, None, [], [], None)
    started = []

    def fake_run(setup, row, seed, gpu, log_dir, threads=None, slot=0):
        started.append((row, seed))
        if len(started) == 1:
            time.sleep(0.3)  # the other job has started meanwhile
            raise PipelineError("run table5-full-s3407 failed (boom)")
        time.sleep(1.0)  # and is still running when the first one fails
        return setup.run_name(row, seed), 0.5

    monkeypatch.setattr(ablate, "run_one", fake_run)
    with pytest.raises(PipelineError, match="boom"):
        ablate.ablate(setup, jobs=2, echo=lambda _: None)
    assert len(started) == 2  # the failed run and the one running beside it, no third
