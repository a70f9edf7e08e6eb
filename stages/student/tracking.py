"""The run's dvclive log: opened on the main rank (a no-op logger elsewhere), rewound to the
checkpoint on resume so each step is logged exactly once, and its DVC repository closed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import weakref
from pathlib import Path
from typing import Any

from stages.student import distributed


def open_live(live_dir: Path, start: int,
              world: distributed.World) -> tuple[Any, weakref.finalize]:
    """dvclive's logger for a run starting after `start` steps (rewound to it when resuming),
    and the call that closes the DVC repository it opened."""
    from dvclive import Live

    if start > 0 and world.main:  # steps logged after the checkpoint by a killed run
        rewind_live(live_dir, start)  # are logged again
    if world.main:
        live = Live(dir=str(live_dir), resume=start > 0, dvcyaml=False,
                    save_dvc_exp=False, report=None)
        # dvclive's step = optimiser steps done (1-based, as "trained N steps" and the
        # checkpoint's step); its own resume guesses from metrics.json, the checkpoint knows
        live.step = start + 1
    else:
        live = distributed.NullLive()
    return live, closes_dvc_repo(live)


def rewind_live(live_dir: Path, step: int) -> None:
    """Make dvclive's files say what a run stopped at `step` would have logged: drop the
    rows of steps > `step` (logged after the checkpoint by a killed run) and restore the
    summary from the rows kept, so a resumed run logs each step exactly once."""
    if not live_dir.is_dir():
        return
    summary: dict[str, Any] = {}
    for tsv in sorted((live_dir / "plots" / "metrics").rglob("*.tsv")):
        with open(tsv, newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if int(r["step"]) <= step]
        tmp = tsv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fields, delimiter="\t", lineterminator=os.linesep)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, tsv)
        if kept:
            *groups, name = tsv.relative_to(live_dir / "plots" / "metrics").with_suffix("").parts
            node = summary
            for g in groups:
                node = node.setdefault(g, {})
            value = float(kept[-1][name])
            node[name] = value if math.isfinite(value) else str(value)
    if step > 0:
        summary["step"] = step
    (live_dir / "metrics.json").write_text(json.dumps(summary, indent=4))


def closes_dvc_repo(live: Any) -> weakref.finalize:
    """Close the DVC repository dvclive opened (its git object store) when `live` goes away,
    or at exit before the interpreter tears its modules down. dvclive never closes it, and a
    failed run's traceback keeps `live` alive until shutdown, where dulwich's `__del__`
    printed "Exception ignored ... sys.meta_path is None". Calling the result closes now."""
    repo = getattr(live, "_dvc_repo", None)
    return weakref.finalize(live, repo.close if repo is not None else lambda: None)
