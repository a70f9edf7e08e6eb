"""What an evaluation scored: the checkpoint, the frames, the protocol and the averaging.

A report without it cannot tell a two-frame smoke run from a full evaluation, or say
how many sensor groups a `mean_of_groups_mIoU` averaged; so every report carries it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from any2seg.datasets import SampleSequence


def sha256_prefix(path: Path, length: int = 12) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def provenance(checkpoint: Path, step: int | None, dataset: str, root: Path, split: str,
               scored: SampleSequence, in_split: int, protocol: str, missing: str,
               mode: str, groups: tuple[str, ...]) -> dict[str, Any]:
    """The facts behind a set of scores, as report.md and provenance.json state them."""
    counts = Counter(g for r in scored.records for g in (r.condition, r.case) if g)
    first = scored.records[0].files if len(scored) else {}
    # what a depth column shows: DELIVER-format readers serve HHA from hha/ by default
    inputs = {m: "HHA" for m, f in first.items()  # str(): a packed file is no PathLike
              if m == "depth" and "hha" in Path(str(f)).parts}
    present = [g for g in groups if counts.get(g)]
    return {
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_prefix(checkpoint),
                       "step": step},
        "dataset": dataset, "root": str(root), "split": split,
        "frames_scored": len(scored), "frames_in_split": in_split,
        "protocol": protocol, "missing": missing, "mode": mode, "inputs": inputs,
        "sensor_groups": {g: counts.get(g, 0) for g in groups},
        "averaging": {"mIoU": "mean over all classes (absent classes count 0)",
                      "miss.mean_mIoU": "mean over the modality subsets",
                      "sensor.mean_of_groups_mIoU":
                          f"mean over the {len(present)} of {len(groups)} sensor groups "
                          "with frames in the scored split"},
    }


def provenance_markdown(p: dict[str, Any]) -> str:
    """The report's opening lines: which checkpoint, how many frames, how averaged."""
    ck = p["checkpoint"]
    part = "" if p["frames_scored"] == p["frames_in_split"] else \
        " (a limited run: not a full evaluation)"
    lines = [
        f"Checkpoint `{ck['path']}` (sha256 {ck['sha256']}, step {ck['step']}); "
        f"{p['dataset']} at `{p['root']}`, split `{p['split']}`: "
        f"{p['frames_scored']} of {p['frames_in_split']} frames scored{part}; protocol "
        f"`{p['protocol']}`, missing-sensor mode `{p['missing']}`, inference `{p['mode']}`.",
        "",
        f"Sensor groups: {p['averaging']['sensor.mean_of_groups_mIoU']}.",
        "",
        "| sensor group | frames |",
        "|---|---:|",
        *(f"| {g} | {n} |" for g, n in p["sensor_groups"].items() if n),
    ]
    absent = [g for g, n in p["sensor_groups"].items() if not n]
    if absent:
        lines += ["", f"Absent from the scored frames (not averaged): {', '.join(absent)}."]
    return "\n".join(lines)
