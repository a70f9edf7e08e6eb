"""Layers that point one way, and DVC stage deps that match the code each stage runs.

That an edit reruns exactly the stages whose listed code holds it is
tests/e2e/test_dvc.py::test_a_code_edit_reruns_exactly_the_stages_that_run_it (DVC itself).
"""

import ast
from pathlib import Path

import pytest
import yaml

from tests import stage_deps

ROOT = stage_deps.REPO
LIBRARY = ("any2seg", "stages")


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_the_library_layer_never_imports_the_application_layer():
    """any2seg/ and stages/ are what DVC stages run; pipeline/ (the command, help text, the
    ablation runner) sits on top. An import the other way would make a help-text edit a
    change to a stage's code."""
    offenders = [f"{p.relative_to(ROOT)}: {m}" for package in LIBRARY
                 for p in sorted((ROOT / package).rglob("*.py"))
                 for m in _imported(p) if m.split(".")[0] == "pipeline"]
    assert not offenders, offenders


def test_the_shared_library_never_imports_a_stage():
    offenders = [f"{p.relative_to(ROOT)}: {m}" for p in sorted((ROOT / "any2seg").rglob("*.py"))
                 for m in _imported(p) if m.split(".")[0] == "stages"]
    assert not offenders, offenders


def test_the_student_stage_never_imports_the_teacher_stage():
    """The point of the cache: stage two reads targets, never runs a teacher."""
    offenders = [f"{p.relative_to(ROOT)}: {m}"
                 for p in sorted((ROOT / "stages" / "student").rglob("*.py"))
                 for m in _imported(p) if m.startswith("stages.teacher")]
    assert not offenders, offenders


@pytest.mark.parametrize("dvc_file", stage_deps.dvc_files(), ids=lambda p: p.parent.name)
def test_every_stage_lists_exactly_the_code_it_imports(dvc_file):
    stages = yaml.safe_load(dvc_file.read_text())["stages"]
    checked = 0
    for name, stage in stages.items():
        code = sorted(d for d in stage.get("deps", []) if stage_deps.is_code_dep(d))
        assert not [d for d in code if d.split("/")[0] == stage_deps.APPLICATION], name
        if name in stage_deps.STAGE_ENTRIES:
            expected = stage_deps.stage_deps(name)
            assert code == expected, (
                f"{dvc_file.relative_to(ROOT)} stage {name}: run "
                f"`python -m tests.stage_deps --write`\n+{set(expected) - set(code)}\n"
                f"-{set(code) - set(expected)}")
            checked += 1
        else:
            assert not code, f"{name}: add it to tests/stage_deps.py STAGE_ENTRIES"
    assert checked == len(stages)


def test_the_closure_follows_imports_inside_functions(tmp_path):
    """data.py imports the code targets inside a function: they are still the stage's."""
    files = {p.relative_to(ROOT).as_posix() for p in stage_deps.closure(("stages.student.data",))}
    assert "stages/student/code_targets.py" in files
    assert "stages/student/losses.py" not in files  # CodeAlign's data path needs no losses


def test_collapse_names_a_folder_only_when_every_module_is_used():
    files = stage_deps.closure(("any2seg.synth",))
    deps = stage_deps.collapse(files)
    assert "any2seg/synth" in deps and "any2seg/datasets" not in deps
    assert not any(d.startswith("any2seg/synth/") for d in deps)


def test_the_embedded_stages_link_to_the_folders_params_yaml_names():
    """The fitted teacher and the sample are written to literal folders (so a teacher.root
    pointed at a download is never overwritten); by default params.yaml names exactly those
    folders, so cache_teacher reads what the teacher and sample stages write."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["teacher"]["outs"] == [params["teacher"]["root"]]
    assert stages["sample"]["outs"] == [params["dataset"]["root"]]
    assert "${teacher.root}" in stages["cache_teacher"]["deps"]
    assert "${dataset.root}" in stages["cache_teacher"]["deps"]
    assert f"--out {params['teacher']['root']}" in stages["teacher"]["cmd"]
