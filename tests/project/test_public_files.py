"""The files a public project carries: the license pyproject.toml declares, a citation
file and a changelog that name the current version."""

import re
import tomllib
from pathlib import Path

import yaml

from any2seg import __version__

ROOT = Path(__file__).resolve().parents[2]


def test_the_license_file_is_the_license_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    text = (ROOT / "LICENSE").read_text()
    assert declared == "Apache-2.0"
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a notice


def test_the_citation_names_this_version_and_both_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["version"] == __version__
    assert cff["license"] == tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "project"]["license"]
    titles = [r["title"] for r in cff["references"]]
    assert any("Semantic Segmentation from Any Modalities" in t for t in titles)  # Any2Seg
    assert any("Modality Isolation" in t for t in titles)  # CodeAlign
    assert all(r["authors"] and r["year"] for r in cff["references"])


def test_the_changelog_starts_with_the_current_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    first = re.search(r"^## \[([^\]]+)\]", text, re.M)
    assert first is not None and first[1] == __version__
