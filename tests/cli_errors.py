"""Running the command line inside a test and checking the one line it ends with on bad
input, shared by the error tests of every package (tests/*/test_*_errors.py and others)."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def params_with(tmp_path: Path, edits: dict) -> Path:
    """The project's params.yaml with dotted keys replaced (a missing group is created)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in edits.items():
        *groups, key = dotted.split(".")
        node = params
        for group in groups:
            node = node.setdefault(group, {})
        node[key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_cli(capsys: pytest.CaptureFixture, argv: Iterable) -> tuple[object, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_line_error(code: object, err: str, *named: str) -> None:
    assert code not in (0, None), err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for text in named:
        assert text in err, (text, err)


def assert_work_fails_in_one_line(case: tuple[str, Callable, list[str]],
                                  deliver_root: tuple[Path, object], tmp_path: Path) -> None:
    """A row of a WORK_CASES table: an input that passes every check of the settings and
    goes wrong where the work happens. The command runs in a subprocess, so a native crash
    fails its row instead of the suite."""
    _, build, named = case
    root, _ = deliver_root
    args, prelude = build(tmp_path, root)
    script = f"{prelude}\nimport sys\nfrom pipeline.cli import main\nmain(sys.argv[1:])\n"
    done = subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]  # not a signal (-11: SIGSEGV)
    assert "Traceback" not in done.stderr and lines[-1].startswith("error: "), done.stderr
    assert sum(line.startswith("error: ") for line in lines) == 1
    for text in named:
        assert text in lines[-1], (text, lines[-1])
    packs = tmp_path / "packs"
    assert not packs.exists() or list(packs.iterdir()) == []  # no half pack left
