"""Checkpoints of a training run: what `last.pt` / `best.pt` hold, the atomic write, and
resuming (refusing a checkpoint of another format version, other settings or another
teacher cache before anything is restored).

Format (version `CHECKPOINT_VERSION`): a dict of version, step, best (val mIoU), meta
(student and train settings, modalities, classes, dataset, steps, palette, the teacher
cache's fingerprints), model, translators, optimizer and rng (torch, numpy, python, cuda),
all in plain types (`checkpoint_file`: read without running code; numpy's RNG state as a
tuple with an int64 tensor, or the numpy array that files of earlier versions hold).
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


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint to resume from, refused in one line when its format is not this one
    or it holds anything but plain data (`load_checkpoint_file`)."""
    ckpt = load_checkpoint_file(path, "resume only from a last.pt `pipeline train` wrote, or "
                                      "start a new --out")
    version = ckpt.get("version") if isinstance(ckpt, dict) else None
    if version != CHECKPOINT_VERSION:
        what = (f"format version {version}" if version is not None
                else "no checkpoint format version (not written by `pipeline train`)")
        raise PipelineError(f"{path} has {what}; this version resumes format version "
                            f"{CHECKPOINT_VERSION} only: start a new --out")
    return ckpt


def check_same_settings(last: Path, recorded: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse to resume with student or train settings other than the checkpoint's."""
    if recorded["student"] != now["student"] or recorded["train"] != now["train"]:
        differ = fingerprint_diff(
            {"student": recorded["student"], "train": recorded["train"]},
            {"student": now["student"], "train": now["train"]})
        differ = [d.replace(" in the store,", " in the checkpoint,") for d in differ]
        raise PipelineError(f"{last} was written with other settings ({'; '.join(differ)}); "
                            "resume with the same parameters or start a new --out")


def cache_fingerprints(cache: TeacherCache) -> dict[str, Any]:
    """What a checkpoint records of the store it trained on, to refuse a changed one."""
    return {"path": str(cache.path), "teacher_fingerprint": cache.teacher_fingerprint,
            "dataset_fingerprint": cache.dataset_fingerprint,
            "codebook_fingerprint": cache.codebook_fingerprint}


def check_same_cache(last: Path, recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse to resume on targets other than those the run started with."""
    if recorded is None:
        raise PipelineError(f"{last} records no teacher cache fingerprints (written by an older "
                            "version), so resuming cannot prove the targets are the same; "
                            "start a new --out")
    changed = [f"teacher {d}" for d in fingerprint_diff(recorded["teacher_fingerprint"],
                                                         now["teacher_fingerprint"])]
    if recorded.get("codebook_fingerprint") != now.get("codebook_fingerprint"):
        changed.append(f"codebooks ({recorded.get('codebook_fingerprint')} at the checkpoint, "
                       f"{now.get('codebook_fingerprint')} now)")
    if recorded["dataset_fingerprint"] != now["dataset_fingerprint"]:
        changed.append(f"dataset fingerprint ({recorded['dataset_fingerprint']} at the "
                       f"checkpoint, {now['dataset_fingerprint']} now: rows were recomputed "
                       "from changed files, or the store was rebuilt for other samples)")
    if changed:
        shown = "; ".join(changed[:4]).replace(" in the store, ", " at the checkpoint, ")
        raise PipelineError(f"{now['path']} changed since {last} was written: {shown}; "
                            "resuming would mix targets of two caches: start a new --out, or "
                            "restore the cache the run started with")


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
