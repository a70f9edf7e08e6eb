"""Dataset API shared by both stages and by users.

    from pipeline import datasets
    val = datasets.load("deliver", "data/DELIVER", "val", modalities=["rgb", "depth"])
    sample = val[0]          # Sample(id, modalities{name: HxWx3 image}, label HxW int64, ...)
    datasets.info("deliver", "data/DELIVER")   # counts per split / condition / case

New formats register a `DatasetReader` with `pipeline.datasets.register`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.datasets import deliver, mcubes, sample  # noqa: F401  (registers readers)
from pipeline.datasets.base import Record, Sample, SampleSequence
from pipeline.datasets.registry import DatasetReader, available, get, register

__all__ = ["DatasetReader", "Record", "Sample", "SampleSequence", "available", "get", "info",
           "load", "register"]


def load(name: str, root: str | Path | None = None, split: str | Sequence[str] = "train",
         **options: Any) -> SampleSequence:
    """Samples of dataset `name` under `root` (the reader's default root when None)."""
    return get(name).load(root, split, **options)


def info(name: str, root: str | Path | None = None) -> dict[str, Any]:
    """Class names and sample counts per split, condition and case, without decoding."""
    return get(name).info(root)
