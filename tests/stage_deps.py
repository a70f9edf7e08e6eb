"""The code each DVC stage runs, computed from imports: what its `deps:` must list.

A stage lists the library and stage code it executes and nothing of the application layer
(`pipeline/`: command declarations, help text, the ablation runner, reports), so an edit
there reruns nothing, and an edit to e.g. `stages/student/losses.py` reruns only the stages
whose code imports it. The list is the import closure of the stage's entry modules
(imports inside functions count), written as folders where every module of a folder is in
it and as files otherwise.

    python -m tests.stage_deps           # print each stage's code deps
    python -m tests.stage_deps --write   # rewrite them in dvc.yaml and pipelines/*/dvc.yaml

tests/project/test_stage_deps.py checks every dvc.yaml against it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CODE_ROOTS = ("any2seg", "stages", "pipeline")
APPLICATION = "pipeline"

# DVC stage -> the modules its command calls into (read off pipeline/cli/*.py)
STAGE_ENTRIES: dict[str, tuple[str, ...]] = {
    "sample": ("any2seg.synth",),
    "teacher": ("stages.teacher.default.fit", "stages.teacher.default.quality",
                "stages.teacher.default.config", "stages.teacher.config", "any2seg.config"),
    "cache_teacher": ("stages.teacher.run", "any2seg.config"),
    "train": ("stages.student.train", "stages.student.config", "stages.student.distributed",
              "any2seg.config", "any2seg.devices"),
    "evaluate": ("stages.student.evaluate", "stages.student.evaluate_run",
                 "stages.student.eval_config", "any2seg.config", "any2seg.devices"),
    "codealign_stage0": ("stages.student.codealign.stages", "stages.student.codealign.config",
                         "stages.student.model", "any2seg.config"),
    "codealign_evaluate": ("stages.student.codealign.evaluate",
                           "stages.student.codealign.stages", "stages.student.codealign.config",
                           "stages.student.model", "any2seg.config"),
}
STAGE_ENTRIES["codealign_stage1"] = STAGE_ENTRIES["codealign_stage0"]
STAGE_ENTRIES["codealign_stage2"] = STAGE_ENTRIES["codealign_stage0"]


def _module_file(module: str) -> Path | None:
    path = REPO.joinpath(*module.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(path: Path) -> set[str]:
    rel = path.relative_to(REPO).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package[: len(package) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in CODE_ROOTS}


def closure(modules: tuple[str, ...]) -> set[Path]:
    """Every project file that importing `modules` can execute (parent packages included)."""
    seen: set[Path] = set()
    todo = list(modules)
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:i]))
            if path is not None and path not in seen:
                seen.add(path)
                todo.extend(_imports(path))
    return seen


def collapse(files: set[Path]) -> list[str]:
    """Repository-relative deps: a folder when all of its modules are in `files`."""
    def whole(folder: Path) -> bool:
        return all(p in files for p in folder.rglob("*.py") if "__pycache__" not in p.parts)

    out: set[str] = set()
    for path in files:
        top = path
        while top.parent != REPO and whole(top.parent):
            top = top.parent
        out.add(top.relative_to(REPO).as_posix())
    return sorted(out)


def stage_deps(stage: str) -> list[str]:
    return collapse(closure(STAGE_ENTRIES[stage]))


def dvc_files() -> list[Path]:
    return [REPO / "dvc.yaml", *sorted(REPO.glob("pipelines/*/dvc.yaml"))]


def is_code_dep(dep: str) -> bool:
    return dep.split("/", 1)[0] in CODE_ROOTS


def rewrite(path: Path) -> bool:
    """Replace the code deps of every known stage in `path`, keeping all other lines."""
    old = path.read_text()
    lines = old.splitlines(keepends=True)
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        named = re.match(r"  (\w+):", line)
        if named:
            stage = named.group(1)
        out.append(line)
        i += 1
        if stage in STAGE_ENTRIES and line.startswith("    deps:"):
            block = []
            while i < len(lines) and lines[i].startswith("      - "):
                block.append(lines[i])
                i += 1
            out.extend(x for x in block if not is_code_dep(x.strip()[2:]))
            out.extend(f"      - {dep}\n" for dep in stage_deps(stage))
    text = "".join(out)
    path.write_text(text)
    return text != old


if __name__ == "__main__":
    import sys

    if "--write" in sys.argv:
        for f in dvc_files():
            print(f"{f.relative_to(REPO)}: {'rewritten' if rewrite(f) else 'current'}")
    else:
        for name in STAGE_ENTRIES:
            print(f"{name}:")
            for dep in stage_deps(name):
                print(f"  - {dep}")
