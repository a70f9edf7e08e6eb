"""The README is a front door with docs/ behind it: every relative link and `#anchor` in
README.md and docs/*.md must resolve (GitHub's heading slugs), and no docs page may be
orphaned, so a moved or renamed section breaks a test instead of a reader's click."""

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [ROOT / "README.md", *DOCS]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is no heading)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, punctuation dropped
    (letters, digits, marks, `_`, `-` and spaces stay), each space a `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = (ch for ch in text
            if ch in "_- " or unicodedata.category(ch)[0] in "LNM")
    return "".join(kept).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor of a page; repeated headings get -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path.read_text()):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    """Relative targets of the page's markdown links (inline code spans left out)."""
    found = []
    for line in prose(path.read_text()):
        line = re.sub(r"`[^`]*`", "", line)
        found += [t for t in LINK.findall(line) if not SCHEME.match(t)]
    return found


def broken(path: Path) -> list[str]:
    """The page's links that point nowhere, each with the reason."""
    problems = []
    for target in links(path):
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{path.name}: {target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{path.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def test_docs_exist_and_readme_is_a_front_door():
    assert DOCS, "docs/ holds the manual"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    assert broken(page) == []


def test_no_docs_page_is_orphaned():
    linked = {(ROOT / t.partition("#")[0]).resolve()
              for t in links(ROOT / "README.md") if t.partition("#")[0]}
    assert [p.name for p in DOCS if p.resolve() not in linked] == []


def test_the_code_map_names_files_that_exist():
    """The README's map answers "where is X" in one step only while its paths are real."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:pipeline|pipelines|stages|configs|benchmarks|tests)/[^`\s]*)`",
                           text))
    assert len(named) > 20
    assert sorted(p for p in named if not (ROOT / p.rstrip("/")).exists()) == []


def test_slugs_follow_github():
    assert slug("Packed data sets: one HDF5 file instead of ~40,000 PNGs") == \
        "packed-data-sets-one-hdf5-file-instead-of-40000-pngs"
    assert slug("Ablations: `pipeline ablate`") == "ablations-pipeline-ablate"
    assert slug("The GPU check, and what to expect on GPUs") == \
        "the-gpu-check-and-what-to-expect-on-gpus"
    assert slug("Teacher-code distillation and compression (not CodeAlign)") == \
        "teacher-code-distillation-and-compression-not-codealign"


def test_a_broken_link_or_anchor_is_reported(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)  # relative names in the messages
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n## Real section\n\n```bash\n# not a heading\n```\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#real-section) [file](docs/b.md) "
                    "[anchor](docs/a.md#not-a-heading)\n"
                    "[self](#nowhere) `[code](docs/c.md)` [web](https://example.org/x)\n")
    assert broken(page) == ["README.md: docs/b.md: no file docs/b.md",
                            "README.md: docs/a.md#not-a-heading: no heading #not-a-heading in a.md",
                            "README.md: #nowhere: no heading #nowhere in README.md"]
