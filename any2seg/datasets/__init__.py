"""Dataset API shared by both stages and by users.

    from any2seg import datasets
    val = datasets.load("deliver", "data/DELIVER", "val", modalities=["rgb", "depth"])
    sample = val[0]          # Sample(id, modalities{name: HxWx3 image}, label HxW int64, ...)
    datasets.info("deliver", "data/DELIVER")   # counts per split / condition / case

New formats register a `DatasetReader` with `any2seg.datasets.register`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from any2seg.datasets import deliver, mcubes, sample  # noqa: F401  (registers readers)
from any2seg.datasets.base import Record, Sample, SampleSequence
from any2seg.datasets.registry import DatasetReader, available, get, register

__all__ = ["DatasetReader", "Record", "Sample", "SampleSequence", "available", "check", "get",
           "info", "load", "register"]


def load(name: str, root: str | Path | None = None, split: str | Sequence[str] = "train",
         **options: Any) -> SampleSequence:
    """Samples of dataset `name` under `root` (the reader's default root when None)."""
    return get(name).load(root, split, **options)


def info(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """Class names and sample counts per split, condition and case, without decoding."""
    return get(name).info(root)


def check(name: str, root: Path, split: str) -> tuple[int, list[str]]:
    """Decode every sample of the splits: how many there are, and one line per missing,
    corrupt or mislabelled one (what readers' --skip-bad would drop)."""
    from any2seg.datasets.base import as_list, find_undecodable
    from any2seg.errors import PipelineError

    reader = get(name)
    records = reader.index(root, split, **reader.every_file_options)
    expected = f"; expected {root}/{reader.layout}" if reader.layout else ""
    if not records:
        raise PipelineError(f"no {name} samples of {split} under {root}{expected}")
    problems = [f"split {s}: no samples{expected}" for s in as_list(split) or []
                if not any(r.split == s for r in records)]
    complete = []
    for r in records:
        missing = [f"{k} file {p}" for k, p in r.files.items() if not p.is_file()]
        if missing:
            problems.append(f"{r.id}: missing {missing[0]}")
        else:
            complete.append(r)
    problems += [f"{r.id}: {msg}" for r, msg in find_undecodable(complete, reader.decode, name)]
    return len(records), problems
