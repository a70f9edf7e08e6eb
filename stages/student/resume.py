"""Whether a run folder's `last.pt` continues the run asked for.

`pipeline train --resume` (strict) continues from `last.pt` and refuses one written with
other settings or on another teacher cache. `--resume auto` (what the DVC `train` stage
runs, with its checkpoints `persist`ed) continues when everything that shapes the weights
is the same - the student and train settings, the teacher cache's fingerprints (teacher,
data, codebooks) and the source of the code that trains - and otherwise starts fresh,
saying in one line what differs. Settings that change how a run is computed, not what it
computes (`RESULT_NEUTRAL`, and what `TrainConfig.settings` already leaves out), may
differ. A finished run is recognised only when all of it is equal: DVC never deletes a
persisted output, so a finished run of other settings must not pass for this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from any2seg.errors import PipelineError
from any2seg.store import fingerprint_diff
from stages.student.checkpoint import cache_diff, check_format, read_checkpoint_file
from stages.student.code_version import code_diff

# recorded in a checkpoint's meta["train"] but never compared: where and how often the
# run writes or computes, not what it computes
RESULT_NEUTRAL = ("device", "checkpoint_every")
MODES = ("strict", "auto")
SHOWN = 4  # differences named in the one line; the rest are counted


@dataclass(frozen=True)
class Decision:
    """What a run does with its folder: `fresh` (from step 0), `resume` (from `step`, with
    the loaded `checkpoint`) or `finished` (nothing to do). `why`: the one line saying why
    an existing last.pt is not continued (empty otherwise)."""

    action: str
    step: int = 0
    why: str = ""
    checkpoint: dict[str, Any] | None = None


def settings_diff(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The student and train settings that differ, as `train.lr (0.001 at the checkpoint,
    0.002 now)`, leaving out the result-neutral ones."""
    def comparable(meta: dict[str, Any]) -> dict[str, Any]:
        train = {k: v for k, v in meta["train"].items() if k not in RESULT_NEUTRAL}
        return {"student": meta["student"], "train": train}

    return [d.replace(" in the store,", " at the checkpoint,")
            for d in fingerprint_diff(comparable(recorded), comparable(now))]


def one_line(items: list[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def decide(last: Path, now: dict[str, Any], steps: int, mode: str) -> Decision:
    """What to do with `last` (a run folder's last.pt) for a run of `now` (the meta the run
    would record) and `steps` steps. `strict` refuses what `auto` starts afresh."""
    if mode not in MODES:
        raise PipelineError(f"--resume {mode}: use one of {', '.join(MODES)}")
    if not last.is_file():
        if mode == "strict":
            raise PipelineError(f"nothing to resume: {last} does not exist")
        return Decision("fresh")
    ckpt = read_checkpoint_file(last)  # unreadable: refused in both modes, never replaced
    try:
        check_format(last, ckpt)
    except PipelineError as exc:
        if mode == "strict":
            raise
        return Decision("fresh", why=f"{str(exc).split('; ')[0]}: starting fresh")
    recorded = ckpt["meta"]
    settings = settings_diff(recorded, now)
    if mode == "strict":
        if settings:
            raise PipelineError(f"{last} was written with other settings ({one_line(settings)})"
                                "; resume with the same parameters or start a new --out")
        if int(ckpt["step"]) >= steps:
            return Decision("finished", int(ckpt["step"]), checkpoint=ckpt)
        changed = cache_diff(recorded.get("cache"), now["cache"], last)
        if changed:
            raise PipelineError(f"{now['cache']['path']} changed since {last} was written: "
                                f"{one_line(changed)}; resuming would mix targets of two "
                                "caches: start a new --out, or restore the cache the run "
                                "started with")
        return Decision("resume", int(ckpt["step"]), checkpoint=ckpt)
    differ = settings + cache_diff(recorded.get("cache"), now["cache"], last) + \
        code_diff(recorded.get("code"), now["code"])
    if differ:
        return Decision("fresh", why=f"{last} (step {int(ckpt['step'])}) does not continue "
                        f"this run: {one_line(differ)}; starting fresh")
    if int(ckpt["step"]) >= steps:
        return Decision("finished", int(ckpt["step"]), checkpoint=ckpt)
    return Decision("resume", int(ckpt["step"]), checkpoint=ckpt)


def clear_run(out: Path) -> None:
    """Remove what a run of other settings left in `out` (its checkpoints and dvclive log),
    so nothing of it outlives the fresh run: a stale best.pt would otherwise survive a run
    whose validation never scores."""
    import shutil

    for name in ("last.pt", "best.pt"):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "dvclive", ignore_errors=True)
