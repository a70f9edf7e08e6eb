"""Putting freshly generated files in place without touching anything else.

Generators write into a temporary sibling folder and call `publish` at the end, so an
interrupted run never leaves half-written output, and a rerun into an existing folder
replaces only the entries it owns (a user's other files there survive).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path


def publish(tmp: Path, out: Path, owned: Iterable[str]) -> None:
    """Move everything in `tmp` into `out`, first removing `out`'s entries named `owned`."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
        return
    for name in owned:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    for item in tmp.iterdir():
        item.rename(out / item.name)
    tmp.rmdir()
