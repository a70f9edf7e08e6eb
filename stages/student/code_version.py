"""The code a run trains with, as a fingerprint a checkpoint records: a resumed run must
train with the same code, or its weights would come from two versions of it (DVC reruns a
persisted stage after a code edit, and the stage must then start afresh, not continue).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CODE_PACKAGES = ("any2seg", "stages")


def code_fingerprint() -> dict[str, str]:
    """sha256 prefixes of the source of every loaded module of the library and the stage
    packages (module name -> hash): the code a run trains with. A resumed run must train
    with the same code, or its weights would come from two versions of it."""
    out = {}
    for name, module in sorted(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if name.split(".")[0] in CODE_PACKAGES and path and path.endswith(".py"):
            out[name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    return out


def code_diff(recorded: dict[str, str] | None, now: dict[str, str]) -> list[str]:
    """Modules loaded by both runs whose source differs (a module only one run loaded
    comes from a setting that differs, and is named there)."""
    if recorded is None:
        return ["code (not recorded: the checkpoint was written by an older version)"]
    changed = sorted(m for m in set(recorded) & set(now) if recorded[m] != now[m])
    return [f"code of {m} (edited since the checkpoint)" for m in changed]
