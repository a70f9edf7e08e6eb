"""The ablation runner's reuse rule (a finished run counts only with equal params), the
paper's plans (Tables 5-8: every_row, the DELIVER recipe, reference figures), L_base,
`--dry-run` and the plot of the paired differences. No training: finished runs are
experiment refs made by hand, as DVC records them (a commit holding the run's params)."""

import copy
import csv as csv_module
import io
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from any2seg.errors import PipelineError
from pipeline.ablation import report as ablation_report
from pipeline.ablation import run as ablate
from pipeline.ablation.plan import load_plan
from pipeline.ablation.setup import prepare
from stages.student.estimate import duration
from tests.e2e.test_ablate import cli
from tests.e2e.test_dvc import ROOT

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """dvc.yaml, params.yaml, configs/ and pipelines/ in a git repository (nothing run)."""
    import shutil

    for name in ("dvc.yaml", "params.yaml"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    shutil.copytree(ROOT / "pipelines", tmp_path / "pipelines")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def git(repo, *args):
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def record_runs(repo, plan, rows, sets, seeds=1, pipeline=None):
    """Experiments of HEAD as `dvc exp run -S ...` leaves them: one commit per run whose
    params file holds what that run set; returns their names."""
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "project", "--allow-empty")
    rev = git(repo, "rev-parse", "HEAD")
    setup = prepare(plan, seeds, rows, sets, [], pipeline)
    rel = setup.params_path.relative_to(setup.root)
    names = []
    for row, seed in setup.runs():
        recorded = ablate.expected_params(setup, row, seed)
        (repo / rel).write_text(yaml.safe_dump(recorded, sort_keys=False))
        git(repo, "commit", "-qam", f"run {row}")
        name = setup.run_name(row, seed)
        git(repo, "update-ref", f"refs/exps/{rev[:2]}/{rev[2:]}/{name}", "HEAD")
        git(repo, "reset", "-q", "--hard", rev)
        names.append(name)
    return names


def test_a_dropped_set_is_refused_naming_keys_values_and_the_way_on(project):
    names = record_runs(project, "table5", "Lsup", ["train.steps=4", "eval.limit=4"])
    setup = prepare("table5", 1, "Lsup", [], [], None)
    with pytest.raises(PipelineError) as err:
        ablate.ablate(setup, echo=lambda _: None)
    msg = str(err.value)
    assert "\n" not in msg and f"experiment '{names[0]}'" in msg, msg
    assert "eval.limit: 4 there, null now" in msg and "train.steps: 4 there, 350 now" in msg
    assert f"dvc exp remove {' '.join(names)}" in msg and "another plan name" in msg
    # the same options: both runs reused, nothing to run
    said = []
    setup = prepare("table5", 1, "Lsup", ["train.steps=4", "eval.limit=4"], [], None)
    assert sorted(ablate.ablate(setup, echo=said.append)) == sorted(names)
    assert "2 runs, 2 finished, 0 to run" in said[0]


def test_a_changed_set_and_an_edited_params_file_are_refused(project):
    record_runs(project, "table5", "Lsup", ["train.steps=4"])
    setup = prepare("table5", 1, "Lsup", ["train.steps=5"], [], None)
    with pytest.raises(PipelineError, match="train.steps: 4 there, 5 now"):
        ablate.ablate(setup, echo=lambda _: None)
    # a key no -S names: the workspace's params.yaml edited after the runs
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["student"]["dropout"] = 0.2
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    setup = prepare("table5", 1, "Lsup", ["train.steps=4"], [], None)
    with pytest.raises(PipelineError, match=r"student.dropout: 0.1 there, 0.2 now"):
        ablate.ablate(setup, echo=lambda _: None)


def test_report_with_other_options_is_refused(project, capsys):
    record_runs(project, "table5", "Lsup", ["train.steps=4"])
    code, out = cli(capsys, "ablate", "table5", "--rows", "Lsup", "--seeds", "1", "--report",
                    "-S", "train.steps=4", "-S", "eval.limit=2")
    assert code == 1 and "eval.limit: null there, 2 now" in out and out.count("\n") == 1, out


def test_train_seed_under_set_moves_the_first_seed_and_help_says_so(project, capsys):
    assert prepare("table5", 2, "Lsup", ["train.seed=5"], [], None).seeds == [5, 6]
    code, out = cli(capsys, "ablate", "--help")
    assert code == 0 and "-S train.seed=N" in " ".join(out.split())


PAPER_PLANS = {"table5": (["rgb", "depth"], 7), "table6": (["rgb", "depth", "event", "lidar"], 4),
               "table7-rgb": (["rgb"], 2), "table7-rgb-event": (["rgb", "event"], 2),
               "table8-rgb-depth": (["rgb", "depth"], 2),
               "table8-rgb-event": (["rgb", "event"], 2)}


@pytest.mark.parametrize("name", PAPER_PLANS)
def test_the_paper_plans_carry_the_b0_recipe_on_deliver_only(project, name):
    modalities, n_rows = PAPER_PLANS[name]
    deliver = prepare(name, 1, None, [], [], project / "pipelines/deliver/dvc.yaml")
    sample = prepare(name, 1, None, [], [], None)
    assert len(deliver.rows) == n_rows and deliver.paper_setting and not sample.paper_setting
    for row in deliver.rows:
        over = deliver.overrides(row, 3407)
        assert over["student.backbone"] == "mit_b0" and over["student.embed_dim"] == 768
        assert over["student.pretrained"] == "weights/mit-b0"
        assert over["train.modalities"] == modalities
        assert "student.backbone" not in sample.overrides(row, 3407)
        assert sample.overrides(row, 3407)["train.modalities"] == modalities
    plan = load_plan(name)
    assert plan.reference["values"] or plan.reference["diffs"]


def test_table5_is_l_base_with_the_three_terms_switched(project):
    setup = prepare("table5", 1, None, [], [], None)
    weights = {row: tuple(setup.overrides(row, 1)[f"train.loss.w_{t}"]
                          for t in ("base", "se", "cr", "sup")) for row in setup.rows}
    assert weights == {"base": (1, 0, 0, 0), "Lse": (1, 1, 0, 0), "Lcr": (1, 0, 1, 0),
                       "Lsup": (1, 0, 0, 1), "Lse-Lsup": (1, 1, 0, 1),
                       "Lcr-Lsup": (1, 0, 1, 1), "all": (1, 1, 1, 1)}


def test_the_deliver_recipe_builds_the_b0_student_from_fixture_weights(project):
    from stages.student.config import TrainConfig
    from stages.student.model import build_student
    from tests.student.test_encoder import write_mit

    ref = write_mit(project / "weights" / "mit-b0")
    setup = prepare("table5", 1, "Lsup", [], [], project / "pipelines/deliver/dvc.yaml")
    params = ablate.expected_params(setup, "Lsup", 3407)
    student, cfg = TrainConfig.from_params(params, {}, "pipelines/deliver/params.yaml")
    assert cfg.modalities == ["rgb", "depth"] and cfg.loss_config().w_base == 1.0
    model = build_student(student, cfg.modalities, 25)
    assert model.head.classify.in_channels == 768
    for key, value in ref.segformer.state_dict().items():
        assert torch.equal(model.encoder.model.state_dict()[key], value), key


def fake_runs(setup, values):
    """{name: run} with mss metrics per row: values[row] = [per-seed mIoU]."""
    runs = {}
    for row, per_seed in values.items():
        for seed, v in zip(setup.seeds, per_seed, strict=True):
            runs[setup.run_name(row, seed)] = {
                "row": row, "seed": seed, "commit": "c",
                "metrics": {"mss": {"mIoU": v, "mF1": v + 1, "mAcc": v + 2}}}
    return runs


def test_the_report_prints_the_paper_figures_only_in_the_paper_setting(project):
    values = {"base": [60.0, 61.0], "Lcr": [62.0, 62.5]}
    deliver = prepare("table5", 2, "Lcr", [], [], project / "pipelines/deliver/dvc.yaml")
    summary = ablation_report.summarise(deliver, fake_runs(deliver, values))
    cells = {r["row"]: r["metrics"]["mss.mIoU"].get("reference") for r in summary["rows"]}
    assert cells == {"base": {"mean": 61.93}, "Lcr": {"mean": 62.86}}
    md = ablation_report.markdown(summary, {"teacher": None, "protocol": "x"})
    assert "paper (reference) |" in md and "| 61.93 |" in md and "Table 5" in md
    for setup in (prepare("table5", 2, "Lcr", [], [], None),  # the sample: not the paper's
                  prepare("table5", 2, "Lcr", ["eval.limit=4"], [], project /
                      "pipelines/deliver/dvc.yaml")):  # -S that changes the result
        summary = ablation_report.summarise(setup, fake_runs(setup, values))
        md = ablation_report.markdown(summary, {"teacher": None, "protocol": "x"})
        assert "paper (reference) |" not in md and "61.93" not in md
        assert "reference values): not shown" in md
    run_only = prepare("table5", 2, "Lcr", ["train.nproc=4"], [],
                       project / "pipelines/deliver/dvc.yaml")
    assert run_only.paper_setting  # GPUs change how, not what
    commit(project)  # the shipped recipe in the history: the edit's keys can be named
    edit_recipe(project, ("epochs: 200", "epochs: 1"))
    edited = prepare("table5", 2, "Lcr", [], [], project / "pipelines/deliver/dvc.yaml")
    assert not edited.paper_setting
    assert "train.epochs (1 here, 200 in the shipped recipe)" in \
        ablation_report.reference_note(edited)


def commit(repo, message="project"):
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", message, "--allow-empty")


def edit_recipe(repo, *replacements):
    """pipelines/deliver/params.yaml with each (old, new) text replaced once."""
    params = repo / "pipelines" / "deliver" / "params.yaml"
    text = params.read_text()
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new, 1)
    params.write_text(text)


def deliver_off_recipe():
    return prepare("table5", 1, "Lcr", [], [], Path("pipelines/deliver/dvc.yaml")).off_recipe()


@pytest.mark.parametrize("name", ["deliver", "mcubes"])
def test_the_shipped_recipe_digest_is_the_recipe_files(name):
    """pipelines/NAME/params.yaml is the one recipe file; pipeline.ablation.shipped_recipes
    holds only its digest, the paper's setting `pipeline ablate` recognises."""
    from pipeline.ablation.shipped_recipes import SHIPPED_RECIPES, recipe_digest

    path = ROOT / "pipelines" / name / "params.yaml"
    digest = recipe_digest(yaml.safe_load(path.read_text()))
    assert digest == SHIPPED_RECIPES[name], (
        f"{path.relative_to(ROOT)} changed a student/train/eval value (the digest of the "
        f"shipped {name} recipe is now {digest}): if the recipe changed deliberately, set "
        f"SHIPPED_RECIPES[{name!r}] in pipeline/ablation/shipped_recipes.py to it; else undo "
        "the edit")


def test_the_unchanged_recipe_is_the_paper_setting_in_any_spelling(project):
    """Off the recipe only where a result-relevant value differs: a comment, 1 for 1.0, a
    null written out, the weights' path or a how-to-compute key leave it on."""
    assert deliver_off_recipe() == []  # untracked, never committed: the digest decides
    edit_recipe(project, ("w_sup: 1.0", "w_sup: 1"), ("workers: 8", "workers: 2"),
                ("pretrained: weights/mit-b2", "pretrained: /elsewhere/mit-b2"),
                ("# The DELIVER recipe", "# My copy of the DELIVER recipe"))
    assert deliver_off_recipe() == []
    sample = prepare("table5", 1, "Lcr", [], [], None)
    assert sample.off_recipe() == ["no shipped recipe for 'sample'"]


def test_an_edited_recipe_names_each_changed_key_committed_or_not(project):
    commit(project)
    edit_recipe(project, ("crop: 1024\n  lr: 6.0e-5", "crop: 1024\n  lr: 1.0e-4"))
    assert deliver_off_recipe() == ["train.lr (0.0001 here, 6e-05 in the shipped recipe)"]
    commit(project, "lr 1e-4")  # HEAD's file is edited now: the history's older one is found
    edit_recipe(project, ("dropout: 0.1", "dropout: 0.2"))
    setup = prepare("table5", 1, "Lcr", ["eval.limit=4"], [], Path("pipelines/deliver/dvc.yaml"))
    assert setup.off_recipe() == [
        "-S eval.limit", "student.dropout (0.2 here, 0.1 in the shipped recipe)",
        "train.lr (0.0001 here, 6e-05 in the shipped recipe)"]
    edit_recipe(project, ("val_limit: null", "val_limit: 8"), ("  val_every: 2000\n", ""))
    off = deliver_off_recipe()
    assert "train.val_limit (8 here, absent in the shipped recipe)" in off
    assert "train.val_every (absent here, 2000 in the shipped recipe)" in off
    assert "train.val_limit (8 here, null" not in " ".join(off)  # null counts as absent


def test_without_the_shipped_recipe_in_its_history_the_digest_is_named(project):
    """A project whose history never held the shipped file (a copy, a fresh git init):
    the params are still told apart from the recipe, by digest, in one entry."""
    from pipeline.ablation.shipped_recipes import SHIPPED_RECIPES

    edit_recipe(project, ("epochs: 200", "epochs: 1"))
    for _ in range(2):  # untracked, then committed edited
        (entry,) = deliver_off_recipe()
        assert entry == (f"pipelines/deliver/params.yaml differs from the shipped deliver "
                         f"recipe (sha256 {SHIPPED_RECIPES['deliver'][:12]}...) and no commit "
                         "of this repository holds that recipe, so the differing keys cannot "
                         "be named")
        commit(project)
    setup = prepare("table5", 1, "Lcr", [], [], Path("pipelines/deliver/dvc.yaml"))
    assert not setup.paper_setting
    assert "not shown: not the paper's setting (pipelines/deliver/params.yaml differs" in \
        ablation_report.reference_note(setup)


def test_the_plot_draws_paired_differences_with_intervals_around_zero(project):
    setup = prepare("table5", 3, "Lcr,Lse", [], [], None)
    summary = ablation_report.summarise(setup, fake_runs(setup, {
        "base": [60.0, 61.0, 60.5], "Lcr": [62.0, 62.5, 62.2], "Lse": [59.0, 61.5, 60.0]}))
    fig = ablation_report.figure(summary)
    ax = fig.axes[0]
    assert "base" in ax.get_xaxis().get_label_text()
    assert any(list(line.get_xdata()) == [0, 0] for line in ax.get_lines())  # the zero line
    d = next(r for r in summary["rows"] if r["row"] == "Lcr")["metrics"]["mss.mIoU"]["diff"]
    caps = sorted(x for line in ax.get_lines() for x in line.get_xdata()
                  if len(line.get_xdata()) == 1)
    assert any(math.isclose(c, d["low"]) for c in caps) and \
        any(math.isclose(c, d["high"]) for c in caps)
    assert {t.get_text() for t in ax.texts} == {d["verdict"], next(
        r for r in summary["rows"] if r["row"] == "Lse")["metrics"]["mss.mIoU"]["diff"][
        "verdict"]}
    assert [t.get_text() for t in ax.get_yticklabels()] == ["Lse", "Lcr"] or \
        [t.get_text() for t in ax.get_yticklabels()] == ["Lcr", "Lse"]


def test_dry_run_needs_no_data_or_weights_and_says_what_would_run(project, capsys):
    code, out = cli(capsys, "ablate", "table5", "--seeds", "1", "--dry-run", "--pipeline",
                    "pipelines/deliver/dvc.yaml")
    assert code == 0, out
    assert "7 rows x 1 seed (train.seed 3407) = 7 runs, 0 finished, 7 to start" in out
    assert "student.backbone=mit_b0" in out and "train.modalities=" in out
    assert "not recorded in pipelines/deliver/dvc.lock" in out
    assert "to start (train, evaluate each):" in out and "table5-all-s3407" in out
    # no data: the published split, 200 epochs of global batch 8
    steps = 200 * (3983 // 8)
    assert f"{steps:,} steps" in out and "the published deliver train split" in out
    assert "x 0.17 s/step (declared by the plan's recipe" in out
    code, out = cli(capsys, "ablate", "table5", "--seeds", "1", "--dry-run", "--pipeline",
                    "pipelines/deliver/dvc.yaml", "--step-seconds", "0.5")
    assert "declared by you (--step-seconds)" in out
    assert duration(7 * steps * 0.5) in out


def test_dry_run_lists_finished_runs_and_measures_from_their_logs(project, capsys):
    names = record_runs(project, "table5", "Lsup", ["train.steps=4"])
    logs = project / "ablations" / "table5" / "logs"
    logs.mkdir(parents=True)
    (logs / f"{names[0]}.log").write_text(f"$ dvc ...\nablate: {names[0]} took 8.0 s (exit 0)\n")
    code, out = cli(capsys, "ablate", "table5", "--rows", "Lsup", "--seeds", "2", "--dry-run",
                    "-S", "train.steps=4")
    assert code == 0, out
    assert "4 runs, 2 finished, 2 to start" in out
    assert f"finished (reused, params equal): {', '.join(names)}" in out
    assert "x 2 s/step (measured: the wall time of 1 finished run(s)" in out
    code, out = cli(capsys, "ablate", "table5", "--rows", "Lsup", "--seeds", "1", "--dry-run")
    assert code == 1 and "train.steps: 4 there, 350 now" in out


@pytest.mark.parametrize("variant", ["pixel", "author"])
def test_l_base_scores_the_mean_of_the_per_modality_logits(variant):
    from stages.student.losses import LossConfig
    from stages.student.model import StudentConfig, build_student

    torch.manual_seed(0)
    cfg = StudentConfig(backbone="mit_b0", embed_dim=16, mff={"variant": variant})
    model = build_student(cfg, ["rgb", "depth", "event"], 5).eval()
    images = torch.randn(2, 3, 3, 64, 64)
    present = torch.tensor([[True, True, False], [True, True, True]])
    assert model(images, present).base_logits is None  # off unless L_base is on
    model.with_base = True
    out = model(images, present)
    per = model.modality_logits(out.feats, present)
    want = torch.stack([per[0, :2].mean(0), per[1].mean(0)])
    torch.testing.assert_close(out.base_logits, want, rtol=1e-5, atol=1e-5)
    LossConfig(w_sup=0.0, w_cr=0.0, w_se=0.0, w_base=1.0).validate()  # L_base alone trains
    with pytest.raises(PipelineError, match="w_base"):
        LossConfig(w_sup=0.0, w_cr=0.0, w_se=0.0, w_base=0.0).validate()


def test_plan_recipe_and_reference_errors_fail_in_one_line(project, capsys):
    base = {"baseline": "a", "rows": {"a": {}, "b": {"train.loss.w_cr": 0.0}}}
    for extra, message in (
            ({"recipe": {"pipelines/deliver/dvc.yaml": {"params": {}, "x": 1}}},
             "recipe 'pipelines/deliver/dvc.yaml' must hold params and step_seconds"),
            ({"recipe": {"dvc.yaml": {"step_seconds": -1}}}, "step_seconds must be a number"),
            ({"reference": {"source": "s", "values": {"c": {"mss.mIoU": 1}}}},
             "reference values: no row 'c'"),
            ({"every_row": {"train.loss.w_xx": 1}}, "every_row / recipe: unknown parameter")):
        path = project / "p.yaml"
        path.write_text(yaml.safe_dump(copy.deepcopy({**base, **extra})))
        code, out = cli(capsys, "ablate", str(path), "--dry-run")
        assert code == 1 and message in out and out.count("\n") == 1, (extra, out)


@pytest.mark.parametrize("which", ["root", "deliver"])
def test_the_compact_exp_show_of_the_docs_shows_the_rows_params(project, which):
    """With the preset pipelines' params files present DVC names every params column
    FILE:KEY; the docs' recipes still show the rows' params, of one file only."""
    doc = (ROOT / "docs" / "ablations.md").read_text()
    recipes = [part.split("'", 1)[0] for part in
               doc.split("dvc exp show --drop '.*' --keep '")[1:]]
    keep = recipes[0] if which == "root" else recipes[1]
    pipeline = None if which == "root" else project / "pipelines/deliver/dvc.yaml"
    subprocess.run(["dvc", "init", "-q"], cwd=project, check=True)
    record_runs(project, "table5", "Lsup", [], pipeline=pipeline)
    csv = subprocess.run(["dvc", "exp", "show", "--csv", "--drop", ".*", "--keep", keep],
                         cwd=project, check=True, capture_output=True, text=True).stdout
    columns, *lines = list(csv_module.reader(io.StringIO(csv)))
    file = "params.yaml" if which == "root" else "pipelines/deliver/params.yaml"
    assert {f"{file}:train.loss.w_{t}" for t in ("base", "sup", "cr", "se")} <= set(columns)
    assert all(c == "Experiment" or c.startswith(f"{file}:") for c in columns), columns
    rows = {line[0]: dict(zip(columns, line, strict=True)) for line in lines if line}
    w_sup = f"{file}:train.loss.w_sup"
    assert (rows["table5-base-s3407"][w_sup], rows["table5-Lsup-s3407"][w_sup]) == \
        ("0.0", "1.0")
