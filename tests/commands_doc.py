"""docs/commands.md, generated from the `pipeline` command itself: every command and
subcommand with every option and its default exactly as `--help` shows it, run in the
project folder (so defaults marked `params.yaml: KEY` are ./params.yaml's) at a 100-column
terminal. A hand-written list drifted (it lacked `ablate` and `codealign`, a dozen options
and showed defaults no run used).

    python -m tests.commands_doc           # print the page
    python -m tests.commands_doc --write   # rewrite docs/commands.md

tests/application/test_commands_doc.py fails when the page is not what this writes.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
PAGE = REPO / "docs" / "commands.md"
WIDTH = 100

HEAD = """# The `pipeline` command

[Back to the README](../README.md)

Every command has `--help` with its defaults; options with a closed set list what is
registered (datasets, captioners, backbones, devices, dtypes, settings, modes). A default
marked `(params.yaml: KEY)` is the value a run in the project folder takes from
`./params.yaml` (with `--params FILE` on the same command line, `--help` shows that file's
values instead); `(built-in default)` is the config dataclass's, used when the parameters
file does not set the key. Flags override both. Mistakes (a missing root, a corrupt PNG, an
unknown option, a value out of range in `params.yaml`) end in one line on stderr and a
non-zero exit, naming the file and key (`params.yaml: train.crop must be an integer >= 29
..., got 7`) or the flag, and the allowed range; they are checked before anything is
loaded or written. `pipeline --debug ...` shows the traceback. A dataset root may be a
data set folder or a file written by `pipeline pack` ([packed data
sets](datasets.md#packed-data-sets-one-hdf5-file-instead-of-40000-pngs)). Several GPUs:
`torchrun --nproc-per-node N -m pipeline train|evaluate ...` (one process per GPU) or
`--nproc N` ([scaling](scaling.md)).

The rest of this page is generated from the commands themselves (`python -m
tests.commands_doc --write`; `tests/application/test_commands_doc.py` fails when it is not current):
each block is what `pipeline ... --help` prints in this folder.
"""


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path under `group`, depth first in the order `--help` lists them."""
    ctx = click.Context(group, info_name="pipeline")
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        yield (*path, name)
        if isinstance(sub, click.Group):
            yield from commands(sub, (*path, name))


@contextlib.contextmanager
def _in_repo() -> Iterator[None]:
    before = Path.cwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


def help_text(path: tuple[str, ...]) -> str:
    """What `pipeline PATH --help` prints, at WIDTH columns, in the project folder."""
    from pipeline.cli import cli

    out = io.StringIO()
    with _in_repo(), contextlib.redirect_stdout(out):
        try:
            cli.main(args=[*path, "--help"], prog_name="pipeline", standalone_mode=False,
                     terminal_width=WIDTH)
        except SystemExit:  # pragma: no cover - --help returns normally in click 8
            pass
    return out.getvalue().rstrip() + "\n"


def page() -> str:
    """The whole docs/commands.md."""
    from pipeline.cli import cli

    paths = list(commands(cli))
    parts = [HEAD, "## Commands\n"]
    for path in paths:
        name = " ".join(path)
        short = _short_help(path)
        parts.append(f"- [`pipeline {name}`](#{_anchor(name)}): {short}")
    parts.append("\n## `pipeline`\n\n```text\n" + help_text(()) + "```\n")
    for path in paths:
        name = " ".join(path)
        parts.append(f"## `pipeline {name}`\n\n```text\n" + help_text(path) + "```\n")
    return "\n".join(parts).rstrip() + "\n"


def _short_help(path: tuple[str, ...]) -> str:
    from pipeline.cli import cli

    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command.get_short_help_str(limit=WIDTH)


def _anchor(name: str) -> str:
    """GitHub's anchor of the heading `` `pipeline NAME` ``."""
    return "pipeline-" + name.replace(" ", "-")


if __name__ == "__main__":
    text = page()
    if "--write" in sys.argv:
        PAGE.write_text(text)
        print(f"{PAGE.relative_to(REPO)}: written")
    else:
        sys.stdout.write(text)
