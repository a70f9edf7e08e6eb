"""Checkpoints of a training run: what `last.pt` / `best.pt` hold, the atomic write,
reading one back (refusing another format version) and restoring it. Which checkpoint
continues which run (settings, teacher cache, code): `stages.student.resume`.

Format (version `CHECKPOINT_VERSION`): a dict of version, step, best (val mIoU), meta
(student and train settings, modalities, classes, dataset, steps, palette, the teacher
cache's fingerprints, the code's sources), model, translators, optimizer and rng (torch,
numpy, python, cuda), all in plain types (`checkpoint_file`: read without running code;
numpy's RNG state as a tuple with an int64 tensor, or the numpy array that files of earlier
versions hold).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from any2seg.diskspace import write_atomic
from any2seg.errors import PipelineError
from any2seg.store import TeacherCache, fingerprint_diff
from stages.student.checkpoint_file import (
    load_checkpoint_file,
    numpy_rng_state,
    plain,
    set_numpy_rng_state,
)

CHECKPOINT_VERSION = 2  # 2: meta["cache"] holds the teacher cache's fingerprints

RESUME_REMEDY = ("move it away to start this run again, or restore it (it may be the only "
                 "copy of a long run)")


def read_checkpoint_file(path: Path) -> Any:
    """A run folder's checkpoint as saved, read without running code; one that cannot be
    read (or asks for anything but plain data) is refused in one line and left in place."""
    return load_checkpoint_file(path, RESUME_REMEDY)


def check_format(path: Path, ckpt: Any) -> None:
    """Refuse, in one line, a checkpoint of another format version (or not ours)."""
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        what = (f"format version {version}" if version is not None
                else "no checkpoint format version (not written by `pipeline train`)")
        raise PipelineError(f"{path} has {what}; this version resumes format version "
                            f"{CHECKPOINT_VERSION} only: start a new --out")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint to resume from, refused in one line when its format is not this one."""
    ckpt = read_checkpoint_file(path)
    check_format(path, ckpt)
    return ckpt


def cache_fingerprints(cache: TeacherCache) -> dict[str, Any]:
    """What a checkpoint records of the store it trained on, to refuse a changed one."""
    return {"path": str(cache.path), "teacher_fingerprint": cache.teacher_fingerprint,
            "dataset_fingerprint": cache.dataset_fingerprint,
            "codebook_fingerprint": cache.codebook_fingerprint}


def cache_diff(recorded: dict[str, Any] | None, now: dict[str, Any], last: Path) -> list[str]:
    """How the teacher cache a run would train on differs from the one `last` recorded:
    targets of two caches must never be mixed in one run."""
    if recorded is None:
        return [f"teacher cache fingerprints (not recorded in {last}: written by an older "
                "version)"]
    changed = [f"teacher {d}" for d in fingerprint_diff(recorded["teacher_fingerprint"],
                                                         now["teacher_fingerprint"])]
    if recorded.get("codebook_fingerprint") != now.get("codebook_fingerprint"):
        changed.append(f"codebooks ({recorded.get('codebook_fingerprint')} at the checkpoint, "
                       f"{now.get('codebook_fingerprint')} now)")
    if recorded["dataset_fingerprint"] != now["dataset_fingerprint"]:
        changed.append(f"dataset fingerprint ({recorded['dataset_fingerprint']} at the "
                       f"checkpoint, {now['dataset_fingerprint']} now: rows were recomputed "
                       "from changed files, or the store was rebuilt for other samples)")
    return [c.replace(" in the store, ", " at the checkpoint, ") for c in changed]


def restore(ckpt: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            translators: torch.nn.Module | None) -> tuple[int, float]:
    """Load weights, optimizer and every RNG state from `ckpt`; return (step, best)."""
    model.load_state_dict(ckpt["model"])
    if translators is not None:
        translators.load_state_dict(ckpt["translators"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    set_numpy_rng_state(ckpt["rng"]["numpy"])
    random.setstate(ckpt["rng"]["python"])
    if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return int(ckpt["step"]), float(ckpt["best"])


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    step: int, best: float, meta: dict[str, Any],
                    translators: torch.nn.Module | None = None) -> None:
    """Atomic write (temporary file + rename). With the optimizer and every RNG state for
    `last.pt` (resume); weights and metadata only for `best.pt`. Code translators (a
    training-only part, `train.loss.w_teacher_code` / `w_teacher_decoded`) go beside the
    model, never into it, so evaluation loads the same student either way."""
    state = {
        "version": CHECKPOINT_VERSION, "step": step, "best": best, "meta": meta,
        "model": model.state_dict(),
        "translators": translators.state_dict() if translators is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": numpy_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    state = plain(state)  # what load_checkpoint_file reads back, or a TypeError here
    write_atomic(path, lambda tmp: torch.save(state, tmp), _state_bytes(state),
                 f"the checkpoint {path.name} of the run folder")


def _state_bytes(state: Any) -> int:
    """The size a checkpoint takes on disk, near enough: its tensors' bytes plus 5%."""
    total = 0
    stack = [state]
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            total += node.numel() * node.element_size()
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif isinstance(node, np.ndarray):
            total += node.nbytes
    return int(total * 1.05) + 4096
