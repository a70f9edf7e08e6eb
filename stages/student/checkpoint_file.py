"""A checkpoint file read without running code, and what a checkpoint may hold.

A torch checkpoint is a pickle, and `torch.load(weights_only=False)` runs whatever that
pickle calls: a shared `best.pt` could run a command on the machine that evaluates it.
Every reader of the student's and CodeAlign's checkpoints (train --resume, evaluate,
the CodeAlign stages, prediction and export) goes through `load_checkpoint_file`, which
unpickles with torch's weights-only unpickler and this allow-list:

- tensors, dicts (OrderedDict and Counter too), lists, tuples, str, int, float, bool and None: what
  state dicts, optimizer states and this project's metadata are made of;
- uint32 numpy arrays (`NUMPY_ARRAY`): only so that checkpoints written before metadata
  was made plain still load; they hold numpy's RNG state as one. The array is rebuilt
  from its dtype and raw bytes, calling nothing else (an array of another dtype, object
  arrays included, is refused).

A file that needs anything else is refused in one line naming the file and the object
it asked for, before any of it is built. Writers pass what they save through `plain`,
which turns dataclasses into dicts, paths into strings, numpy scalars into Python
numbers and numpy arrays into tensors, and raises on anything else: what this
pipeline writes always reads back.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections import Counter, OrderedDict
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

from any2seg.errors import PipelineError

# numpy's array reconstruction: a format-2 checkpoint's numpy RNG state (np.random.get_state)
NUMPY_ARRAY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
HOLDS = "tensors, dicts, lists, tuples, strings, numbers, booleans and None"


def load_checkpoint_file(path: Path | str,
                         remedy: str = "use a checkpoint this pipeline wrote") -> Any:
    """The object saved at `path`, unpickled without running code; a file that needs
    anything outside the allow-list, or is not a torch file, is refused in one line
    (PipelineError) naming the file, ending with `remedy` (what to do instead)."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(NUMPY_ARRAY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _damaged(exc):
            raise PipelineError(f"{path} is not a readable checkpoint (damaged or not a torch "
                                f"file: {_first_line(exc)}); {remedy}") from None
        raise PipelineError(f"{path} was refused unread: its pickle asks for {_asked(exc)}, "
                            f"and a checkpoint may hold only {HOLDS} (nothing in it ran); "
                            f"{remedy}") from None
    except FileNotFoundError:
        raise PipelineError(f"{path} does not exist; {remedy}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise PipelineError(f"{path} is not a readable checkpoint (damaged or not a torch "
                            f"file: {_first_line(exc)}); {remedy}") from None


def plain(obj: Any, where: str = "checkpoint") -> Any:
    """`obj` in the types a checkpoint may hold: dataclasses -> dicts, paths -> str,
    numpy scalars -> Python numbers, numpy arrays -> tensors; containers whose contents
    are already plain are returned as they are (a state dict keeps its `_metadata`).
    Anything else raises TypeError naming where it sits: saving it would write a file
    `load_checkpoint_file` refuses."""
    if obj is None or type(obj) in (str, bool, int, float) or isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        return obj.item()
    if isinstance(obj, np.ndarray) and obj.dtype.kind in "biuf":
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain(dataclasses.asdict(obj), where)
    if type(obj) in (dict, OrderedDict, Counter):  # Counter: a MultiStepLR's milestones
        out = {}
        for k, v in obj.items():
            if plain(k, where) is not k or isinstance(k, torch.Tensor):
                raise TypeError(f"{where}: the key {k!r} is not a str, number, bool or None")
            out[k] = plain(v, f"{where}[{k!r}]")
        same = all(out[k] is obj[k] for k in obj)
        return obj if same else out
    if type(obj) in (list, tuple):
        items = [plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj, strict=True)):
            return obj
        return items if type(obj) is list else tuple(items)
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} is not a "
                    f"type a checkpoint may hold ({HOLDS})")


def numpy_rng_state() -> tuple[Any, ...]:
    """numpy's global RNG state in plain types (the key array as an int64 tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
            float(cached))


def set_numpy_rng_state(state: tuple[Any, ...]) -> None:
    """Restore a `numpy_rng_state` (or the raw tuple older checkpoints hold)."""
    name, keys, pos, has_gauss, cached = state
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    np.random.set_state((name, keys.astype(np.uint32), pos, has_gauss, cached))


def _asked(exc: BaseException) -> str:
    """What the refused pickle asked for, from torch's message (its first global)."""
    text = str(exc)
    found = re.search(r"GLOBAL (\S+)", text) or \
        re.search(r"but got <class '([^']+)'>", text) or \
        re.search(r"(?:unrecognized function|Unsupported class) <?([^>\s]+)", text)
    if found:
        return f"`{found.group(1).rstrip('.')}`"
    return "an object outside the allow-list"


def _damaged(exc: BaseException) -> bool:
    """torch's weights-only unpickler met bytes that are no pickle at all."""
    return "weights only" not in str(exc).lower() or "Unsupported operand" in str(exc)


def _first_line(exc: BaseException) -> str:
    """The first sentence of an error (torch's go on for a paragraph)."""
    text = " ".join(str(exc).split()).split("WeightsUnpickler error: ")[-1]
    text = text.split(" Check the documentation")[0]
    return (text.split(". ")[0][:160] if text else type(exc).__name__)
