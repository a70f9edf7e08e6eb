"""The `pipeline` command: one entry point for every stage.

User mistakes (bad paths, bad options, broken files) end in one line on stderr and a
non-zero exit; `pipeline --debug ...` shows the traceback instead. This package only parses,
calls the stages and prints; each command group is a module beside this one.
"""

from __future__ import annotations

import errno
import logging
import os
import sys

import click

from any2seg.errors import PipelineError, ReportedError
from pipeline import __version__
from pipeline.cli import ablate, data, inference, student, teacher
from pipeline.cli.codealign import codealign_group
from pipeline.cli.options import CONTEXT, remember_argv


class _OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLineFormatter())
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="any2seg-pipeline")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """any2seg-pipeline: cache frozen teachers once, then train and evaluate Any2Seg students.

    Start with `pipeline make-sample` for the embedded DELIVER-format sample, then inspect
    it with `pipeline datasets info --dataset sample`.
    """
    from any2seg.progress import quiet_library_bars

    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging(debug)
    quiet_library_bars()


for _command in (data.make_sample_cmd, data.datasets_group, data.pack_cmd,
                 teacher.cache_teacher_cmd, teacher.fit_teacher_cmd, teacher.cache_info_cmd,
                 teacher.cache_verify_cmd, student.train_cmd, student.evaluate_cmd,
                 inference.predict_cmd, inference.export_cmd, ablate.ablate_cmd,
                 codealign_group):
    cli.add_command(_command)


def _report_here() -> bool:
    """Whether this process prints the error: always alone; under a multi-process launch
    only the first rank to fail (the others failed with it or because of it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    from stages.student.distributed import first_to_fail

    return first_to_fail()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the click group and turn user errors into one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    remember_argv(args)
    debug = "--debug" in args
    message, code = None, 0
    from any2seg import diskspace
    from pipeline import failures

    command = failures.command_of(args, list(cli.commands))
    # exit outside the except clauses: a SystemExit raised inside one would carry the error
    # and its frames (open files, repositories) into interpreter shutdown
    try:
        empty = failures.empty_argument(args)
        if empty is not None:
            raise PipelineError(f"{empty} is empty; give a value or leave the option out")
        result = cli.main(args=args, prog_name="pipeline", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Abort:
        message, code = "aborted", 130
    except click.UsageError as exc:
        hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx else ""
        message, code = f"{exc.format_message()}{hint}", exc.exit_code
    except click.ClickException as exc:
        message, code = exc.format_message(), exc.exit_code
    except ReportedError as exc:  # a rank printed it already
        code = exc.exitcode
    except PipelineError as exc:
        if debug:
            raise
        message, code = str(exc), 1
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except MemoryError:
        if debug:
            raise
        message, code = failures.memory_line(command), 1
    except OSError as exc:
        if debug:
            raise
        line = failures.os_error_line(exc, command, args)
        message, code = line or f"{exc} (rerun with --debug for a traceback)", 1
    except Exception as exc:
        if failures.is_out_of_memory(exc) and not debug:
            message, code = failures.memory_line(command), 1
        elif diskspace.is_disk_full(exc) and not debug:  # wrapped by torch / h5py
            message, code = failures.os_error_line(OSError(errno.ENOSPC, str(exc)), command,
                                                   args), 1
        elif not _report_here():  # a rank that failed because another one did
            code = 1
        else:
            raise
    if message is not None and _report_here():
        click.echo("error: " + " ".join(line.strip() for line in message.splitlines()), err=True)
    sys.exit(code)
