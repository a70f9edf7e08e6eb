"""Device names every command accepts (`auto`, `cpu`, `cuda`, `cuda:N`) and their resolution.

Checked by name before anything is loaded; whether a CUDA device is really there is asked
of torch only when the run starts.
"""

from __future__ import annotations

import re

from any2seg.errors import PipelineError

DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def is_device(name: object) -> bool:
    return isinstance(name, str) and _DEVICE.fullmatch(name) is not None


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu; refuse CUDA devices that are not there."""
    import torch

    if not is_device(name):
        raise PipelineError(f"device must be one of {', '.join(DEVICE_FORMS)}, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"device {name} was requested but no CUDA device is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise PipelineError(f"device {name} was requested but there are only "
                                f"{torch.cuda.device_count()} CUDA devices (cuda:0..)")
    return name
