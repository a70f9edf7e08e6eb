"""Failures outside the user's input turned into one line that says what was being done and
what to do: out of memory, a full or read-only disk, a path the filesystem refuses, a dask
scheduler that went away. The CLI's error handling calls these; nothing here raises."""

from __future__ import annotations

import errno
import re
from collections.abc import Sequence

# per command: the settings whose size decides the memory a run needs
MEMORY_SETTINGS = {
    "train": "train.batch_size (--batch-size) or train.crop (--crop)",
    "evaluate": "eval.crop (--crop), or evaluate on fewer processes (--nproc)",
    "cache-teacher": "teacher.batch_size (--batch-size) or --decode-workers",
    "fit-teacher": "teacher.fit.batch_size, teacher.fit.hidden or teacher.fit.image_size",
    "make-sample": "--size or --workers",
    "pack": "--workers",
}

# per command: what a rerun does with the work already written
KEPT = {
    "cache-teacher": "the store keeps every finished row and a rerun continues from them",
    "train": "last.pt keeps the last checkpoint and --resume continues from it",
}


# the readers' hint, written for the commands that have --skip-bad
_SKIP_BAD_HINT = re.compile(r",? or pass --skip-bad to skip (this sample|incomplete samples)")


def skip_bad_hint(message: str, has_skip_bad: bool) -> str:
    """`message` with the readers' "or pass --skip-bad" hint only where the command has
    that flag; elsewhere (evaluate) it points at the command that lists every bad file."""
    if has_skip_bad:
        return message
    return _SKIP_BAD_HINT.sub("; `pipeline datasets check` lists every damaged or missing "
                              "file", message)


def command_of(args: Sequence[str], commands: Sequence[str]) -> str | None:
    """The subcommand named on the command line (options of the group may come first)."""
    return next((a for a in args if a in commands), None)


def empty_argument(args: Sequence[str]) -> str | None:
    """The option given an empty value (`--cache ''`, `--split=`), or None. No option of the
    CLI means anything by an empty string; taking it as unset would silently use a default."""
    for i, arg in enumerate(args):
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[1] == "":
            return arg.split("=", 1)[0]
        if arg == "":
            before = args[i - 1] if i and args[i - 1].startswith("--") else None
            return before or f"argument {i + 1}"
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or the RuntimeError torch raises when an allocation fails."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
        or "DefaultCPUAllocator" in text)


def memory_line(command: str | None) -> str:
    setting = MEMORY_SETTINGS.get(command or "", "the batch or image size")
    return (f"out of memory in `pipeline {command or ''}`".replace(" ``", "") +
            f"; lower {setting} and rerun" +
            (f" ({KEPT[command]})" if command in KEPT else ""))


def option_of(filename: str | None, args: Sequence[str]) -> str | None:
    """The option whose value the failing path lies under (`--out` for `<out>/x.tmp`)."""
    if not filename:
        return None
    pairs = [(args[i], args[i + 1]) for i in range(len(args) - 1) if args[i].startswith("--")]
    pairs += [tuple(a.split("=", 1)) for a in args if a.startswith("--") and "=" in a]
    hits = [(len(v), o) for o, v in pairs if v and (filename == v or filename.startswith(
        v.rstrip("/") + "/") or filename.startswith(v))]
    return max(hits)[1] if hits else None


def _is_closed_comm(exc: BaseException) -> bool:
    names = {t.__name__ for t in type(exc).__mro__}
    return "CommClosedError" in names or "Stream is closed" in str(exc)


def os_error_line(exc: OSError, command: str | None, args: Sequence[str]) -> str | None:
    """One line for an OSError the commands do not catch themselves, or None (then the
    raw text is printed)."""
    kept = f"; {KEPT[command]}" if command in KEPT else ""
    if _is_closed_comm(exc):
        address = next((args[i + 1] for i in range(len(args) - 1)
                        if args[i] == "--scheduler"), "teacher.scheduler")
        return (f"the dask scheduler at {address} went away (its connection closed); the store "
                "keeps every finished row: start the scheduler again (or use --scheduler "
                "local:N) and rerun, the rerun continues where this run stopped")
    filename = exc.filename if isinstance(exc.filename, str) else None
    option = option_of(filename, args)
    what = f"{option} {filename}" if option else (filename or "the output")
    fix_option = option or "--out"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device while writing {what}; free space there or "
                f"choose another {fix_option}, then rerun{kept}")
    if exc.errno == errno.EROFS:
        return (f"{what} is on a read-only filesystem; make it writable (or copy it to a "
                f"writable place and pass that as {fix_option}), then rerun{kept}")
    if exc.errno == errno.ENAMETOOLONG:
        return (f"{what}: a name in the path is longer than the filesystem allows; choose a "
                f"shorter {fix_option}")
    if exc.errno == errno.ENOTDIR:
        return (f"{what}: a part of the path is a file, not a folder; choose another "
                f"{fix_option}")
    if exc.errno == errno.EEXIST:
        return f"{what} exists and is a file, not a folder; choose another {fix_option}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{what} is not writable ({exc.strerror}); choose another {fix_option}"
    return None
