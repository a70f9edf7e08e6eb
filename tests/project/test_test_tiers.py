"""The two test tiers together run every test, and CI runs both: `make test` (every test
outside tests/e2e) and `make test-e2e` (tests/e2e), so moving the end-to-end flows out of
the quick tier never moves them out of CI."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def recipe(target: str) -> list[str]:
    """The command lines of a Makefile target."""
    text = (ROOT / "Makefile").read_text()
    body = re.search(rf"^{re.escape(target)}:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.M)
    assert body, f"no {target} target in the Makefile"
    return [line.strip().lstrip("@") for line in body.group(1).splitlines()]


def pytest_line(target: str) -> str:
    (line,) = [c for c in recipe(target) if " -m pytest " in c]
    return line


def test_the_tiers_split_the_suite_at_the_e2e_folder():
    quick, e2e = pytest_line("test"), pytest_line("test-e2e")
    assert quick.split()[-1] == "--ignore=tests/e2e"
    assert "tests/" not in quick.replace("--ignore=tests/e2e", "")  # the rest: every folder
    assert e2e.split()[-1] == "tests/e2e" and "--ignore" not in e2e
    assert list((ROOT / "tests" / "e2e").glob("test_*.py"))


def test_ci_runs_both_tiers():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines  # a failing first tier fails CI
    assert lines.index("make test") < lines.index("make test-e2e")
