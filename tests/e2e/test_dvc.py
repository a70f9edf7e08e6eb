"""The DVC pipeline in a temporary git repository with a tiny configuration."""

import json

import pytest

from tests.dvc_project import (  # noqa: F401 (some imported from here by other modules)
    ROOT,
    STAGE_ONE,
    clone_project,
    copy_project,
    edit_params,
    ran,
    run,
)

pytestmark = pytest.mark.slow
ANY2SEG = {"sample", "teacher", "cache_teacher", "train", "evaluate"}
CODEALIGN = {"codealign_stage0", "codealign_stage1", "codealign_stage2", "codealign_evaluate"}
STAGES = ANY2SEG | CODEALIGN


def skipped(output):
    return {line.split("'")[1] for line in output.splitlines()
            if line.startswith("Stage") and "didn't change, skipping" in line}


@pytest.fixture(scope="module")
def repo(stage_one_project, tmp_path_factory):
    """The tiny pipeline (tests/dvc_project.py) after a full `dvc repro`, in two steps:
    stage one, shared with test_ablate.py, then the rest here; dvc.lock then committed."""
    source, stage_one = stage_one_project
    assert ran(stage_one) == STAGE_ONE
    assert "zero-shot weather" in stage_one  # the teacher stage's fit prints its quality figures
    repo = clone_project(source, tmp_path_factory.mktemp("dvc") / "project")
    out = run(repo, "dvc", "repro")
    assert ran(out) == STAGES - STAGE_ONE and skipped(out) == STAGE_ONE  # every stage ran once
    (repo.parent / "status-after-repro").write_text(run(repo, "git", "status", "--porcelain"))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "lock")
    return repo


def test_repro_leaves_only_an_untracked_dvc_lock(repo):
    """As the README says: the first `make demo` in a clone stages nothing in git, and its
    one new file is DVC's record of the run (outputs are git-ignored)."""
    assert (repo.parent / "status-after-repro").read_text() == "?? dvc.lock\n"


def test_repro_produces_every_declared_output(repo):
    for path in ("data/sample-teacher/LanguageBind_Depth/pytorch_model.bin",
                 "data/sample-teacher/LanguageBind_Lidar/pytorch_model.bin",
                 "data/sample-teacher/teacher.json",
                 "cache/sample.zarr/zarr.json", "runs/sample/best.pt",
                 "runs/sample/dvclive/metrics.json", "metrics/mss.json", "metrics/miss.json",
                 "metrics/sensor.json", "metrics/report.md", "metrics/plots/miss.png"):
        assert (repo / path).exists(), path
    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json"))
    assert "mIoU" in json.dumps(metrics)
    out = run(repo, "dvc", "repro")
    assert not ran(out) and "pipelines are up to date" in out


# a params.yaml edit -> the stages that list it in dvc.yaml, then those plus what depends on them
EDITS = {
    "train.seed": ({"train__seed": 11}, {"train"}, {"train", "evaluate"}),
    # CodeAlign's stage 0 builds its per-group students from the same student.* keys
    "student.mff.select": ({"student__mff__select": False}, {"train", "codealign_stage0"},
                           {"train", "evaluate"} | CODEALIGN),
    "eval.examples": ({"eval__examples": 2}, {"evaluate"}, {"evaluate"}),
    "teacher.dtype": ({"teacher__dtype": "float32"}, {"cache_teacher"},
                      {"cache_teacher", "train", "evaluate"}),
    # the class prompt is read by the fit (prompts vs class regions) and by stage one
    "teacher.class_prompt": ({"teacher__class_prompt": "a photo of a {}."},
                             {"teacher", "cache_teacher"}, ANY2SEG - {"sample"}),
    # CodeAlign: a stage-2 key reruns the translators and their evaluation only
    "codealign.stage2_steps": ({"codealign__stage2_steps": 3}, {"codealign_stage2"},
                               {"codealign_stage2", "codealign_evaluate"}),
    "codealign.codes": ({"codealign__codes": 8}, {"codealign_stage1"},
                        CODEALIGN - {"codealign_stage0"}),
}


@pytest.mark.parametrize("edit, invalidated, reruns", EDITS.values(), ids=EDITS)
def test_a_params_edit_reruns_exactly_the_stages_that_read_it(repo, edit, invalidated, reruns):
    """`dvc status` names the stages whose listed params changed; `dvc repro --dry
    --force-downstream` adds every stage downstream of them (a plain --dry stops at the
    changed stages, as nothing runs to change their outputs). Nothing executes here: that
    a real repro reruns the downstream chain is proved by the experiment and one-image
    tests below."""
    params, lock = repo / "params.yaml", (repo / "dvc.lock").read_text()
    original = params.read_text()
    edit_params(repo, **edit)
    try:
        status = json.loads(run(repo, "dvc", "status", "--json"))
        assert set(status) == invalidated, status
        out = run(repo, "dvc", "repro", "--dry", "--force-downstream")
        assert ran(out) == reruns, out
        assert skipped(out) == STAGES - reruns, out
    finally:
        params.write_text(original)
    assert (repo / "dvc.lock").read_text() == lock  # a dry run records nothing


# a code edit -> the stages whose listed code holds the file (tests/stage_deps.py computes
# the lists from imports), then downstream. The application layer (pipeline/) is no stage's
# dep: an edit to the ablation runner, a report or a command's help text reruns nothing.
READERS = {"teacher", "cache_teacher", "train", "evaluate"} | CODEALIGN
CODE_EDITS = {
    "student loss": ("stages/student/losses.py", {"train"}, {"train", "evaluate"}),
    "teacher": ("stages/teacher/run.py", {"cache_teacher"}, {"cache_teacher", "train", "evaluate"}),
    "data-set reader": ("any2seg/datasets/deliver.py", READERS, READERS),
    "sample generator": ("any2seg/synth/scene.py", {"sample"}, STAGES),
    "ablation runner": ("pipeline/ablation/run.py", set(), set()),
    "ablation report": ("pipeline/ablation/report.py", set(), set()),
    "command help": ("pipeline/cli/student.py", set(), set()),
}


@pytest.mark.parametrize("path, invalidated, reruns", CODE_EDITS.values(), ids=CODE_EDITS)
def test_a_code_edit_reruns_exactly_the_stages_that_run_it(repo, path, invalidated, reruns):
    """Stale results after a method change are the failure this guards: editing the
    student's losses must rerun train and evaluate, and never stage one; and a 20-hour
    training must not rerun for an edit that cannot change it."""
    source, lock = repo / path, (repo / "dvc.lock").read_text()
    original = source.read_text()
    source.write_text(original + "\n# an edit\n")
    try:
        status = json.loads(run(repo, "dvc", "status", "--json"))
        assert set(status) == invalidated, status
        out = run(repo, "dvc", "repro", "--dry", "--force-downstream")
        assert ran(out) == reruns, out
    finally:
        source.write_text(original)
    assert (repo / "dvc.lock").read_text() == lock
    assert not json.loads(run(repo, "dvc", "status", "--json"))  # back to up to date


def test_experiment_reruns_train_and_evaluate_and_records_different_metrics(repo):
    """A train.* change really reruns train and then evaluate, never stage one."""
    store = repo / "cache" / "sample.zarr" / "zarr.json"
    before = store.stat().st_mtime_ns
    out = run(repo, "dvc", "exp", "run", "-S", "train.loss.w_cr=0", "-S", "train.steps=5")
    assert ran(out) == {"train", "evaluate"}
    assert skipped(out) == STAGES - {"train", "evaluate"}
    assert store.stat().st_mtime_ns == before  # stage one never ran
    table = json.loads(run(repo, "dvc", "exp", "show", "--json"))
    found = json.dumps(table)
    assert "w_cr" in found and "mIoU" in found
    csv = run(repo, "dvc", "exp", "show", "--csv", "--only-changed")
    header = csv.splitlines()[0]
    assert "train.steps" in header and "mIoU" in header
    rows = [r for r in csv.splitlines()[1:] if r.strip()]
    assert len(rows) >= 2
    col = header.split(",").index(next(h for h in header.split(",") if h.endswith("mIoU")))
    assert len({r.split(",")[col] for r in rows}) > 1  # the experiment's metrics differ


def test_editing_one_image_recomputes_that_row_only(repo):
    """`dvc repro` after one frame changed (same name, e.g. re-exported) recomputes that row
    of the persisted cache, not the whole cache, and never keeps the stale row; the chain
    downstream of the data really reruns. (That the recomputed row equals a clean build is
    tests/teacher/test_cache_teacher.py::test_an_edited_image_recomputes_exactly_its_row.)"""
    import numpy as np
    import zarr
    from PIL import Image

    image = sorted((repo / "data" / "deliver-sample" / "img").rglob("*_rgb_front.png"))[0]
    store = repo / "cache" / "sample.zarr"
    before = zarr.open_group(str(store), mode="r")["visual/rgb"][:]
    ids = [str(i) for i in zarr.open_group(str(store), mode="r")["sample_id"][:]]
    parts = image.relative_to(repo / "data" / "deliver-sample" / "img").parts
    row = ids.index(f"{parts[0]}/{parts[1]}/{parts[2]}/{parts[3].split('_')[0]}")
    pixels = np.array(Image.open(image))
    Image.fromarray(255 - pixels).save(image)
    run(repo, "dvc", "commit", "-f", "-q", "sample")  # the edited frame is the data now
    out = run(repo, "dvc", "repro", "evaluate")  # the Any2Seg chain (CodeAlign's: not timed)
    # the teacher stage reads the sample too (its fit uses the train split)
    assert ran(out) == ANY2SEG - {"sample"}
    assert f"computed 1 of {len(ids)} rows (1 whose inputs changed)" in out
    after = zarr.open_group(str(store), mode="r")["visual/rgb"][:]
    keep = [i for i in range(len(ids)) if i != row]
    np.testing.assert_array_equal(after[keep], before[keep])
    assert not np.array_equal(after[row], before[row])
    assert set(json.loads(run(repo, "dvc", "status", "--json"))) == CODEALIGN  # not asked for
