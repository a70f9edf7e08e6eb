"""docs/commands.md is generated from the CLI (tests/commands_doc.py) and must be current:
every command, every option, defaults as `--help` shows them."""

import subprocess
import sys

import click

from pipeline.cli import cli
from tests.commands_doc import PAGE, REPO, commands


def test_the_commands_page_is_current():
    """Rendered in a fresh process: a test of this worker may have registered a test-only
    captioner or data set, which the choices in --help would then list."""
    fresh = subprocess.run([sys.executable, "-c", "from tests.commands_doc import page; "
                            "print(page(), end='')"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert PAGE.read_text() == fresh, \
        "docs/commands.md is stale: run python -m tests.commands_doc --write"


def test_every_command_and_option_has_its_section():
    text = PAGE.read_text()
    sections = {s.split("`", 2)[1]: s for s in text.split("\n## ")[1:] if s.startswith("`")}
    paths = list(commands(cli))
    assert {("ablate",), ("codealign",), ("codealign", "stage0"), ("train",)} <= set(paths)
    for path in paths:
        section = sections[" ".join(("pipeline", *path))]
        command = cli
        for name in path:
            command = command.commands[name]
        for param in command.params:
            if isinstance(param, click.Option):
                assert any(opt in section for opt in param.opts), (path, param.name)
    train = sections["pipeline train"]
    for flag in ("--seed", "--params", "--json", "--nproc"):
        assert flag in train
