"""What every dataset reader returns: `Sample`, and a lazy sequence of them.

Readers index the files once (cheap `stat` calls) and decode on access, so a
7885-sample DELIVER split costs nothing until it is iterated; the sequence can be
handed straight to a torch `DataLoader`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from any2seg.errors import DatasetError
from any2seg.progress import progress

log = logging.getLogger("pipeline.datasets")


@dataclass
class Sample:
    """One multi-modal frame: images H x W x 3 keyed by modality, label H x W int64.

    Each image is scaled as the official loader of its data set feeds the model, before
    any mean/std normalisation, and its dtype says how:
    - integer (uint8, or uint16 for DELIVER's 16-bit `depth/` files as MISS reads them):
      the model input is value / 255 (`io.read_image(...).float() / 255`);
    - float: the model input itself (MCubeS AoLP sin/cos in [-1, 1], DoLP, 16-bit NIR / 65535).
    `ranges` gives the nominal (low, high) of float images that are not in [0, 1], so image
    models and pictures can map them to [0, 1] (`unit_image`).

    `raw` keeps, for modalities stored with more than 8 bits (metric depth in
    millimetres), the 2-D array as stored, so a consumer that needs the metric values
    (the LanguageBind depth branch) does not decode the file twice.
    """

    id: str
    modalities: dict[str, np.ndarray]
    label: np.ndarray
    condition: str | None = None
    case: str | None = None
    files: dict[str, Path] = field(default_factory=dict)
    raw: dict[str, np.ndarray] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)

    def unit_image(self, modality: str) -> np.ndarray:
        """The modality as an H x W x 3 float32 image in [0, 1] (see `unit_image`)."""
        return unit_image(self.modalities[modality], self.ranges.get(modality))


def unit_image(arr: np.ndarray, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An image of any stored kind as float32 in [0, 1], for models that read pictures
    (the LanguageBind image branch) and for drawing: integers over their dtype's full
    range (uint8 / 255, uint16 / 65535), floats over `value_range` (default [0, 1]),
    clipped."""
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
    lo, hi = value_range or (0.0, 1.0)
    x = (arr.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(x, 0.0, 1.0)


@dataclass(frozen=True)
class Record:
    """Where one sample lives on disk, before anything is decoded."""

    id: str
    split: str
    files: dict[str, Path]
    condition: str | None = None
    case: str | None = None


Decoder = Callable[[Record], Sample]


class SampleSequence(Sequence[Sample]):
    """A read-only, indexable list of samples decoded lazily from `records`."""

    def __init__(self, name: str, records: list[Record], decode: Decoder,
                 classes: Sequence[str], modalities: Sequence[str]) -> None:
        self.name = name
        self.records = records
        self._decode = decode
        self.classes = list(classes)
        self.modalities = list(modalities)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> Sample: ...
    @overload
    def __getitem__(self, index: slice) -> SampleSequence: ...
    def __getitem__(self, index: int | slice) -> Sample | SampleSequence:
        if isinstance(index, slice):
            return SampleSequence(self.name, self.records[index], self._decode,
                                  self.classes, self.modalities)
        return self._decode(self.records[index])

    def __iter__(self) -> Iterator[Sample]:
        for record in self.records:
            yield self._decode(record)

    def __repr__(self) -> str:
        return (f"SampleSequence({self.name!r}, {len(self)} samples, "
                f"modalities={self.modalities})")


def check_files(records: list[Record], skip_bad: bool, dataset: str) -> list[Record]:
    """Refuse (or with `skip_bad`, drop and log) records whose files are missing."""
    good, problems = [], []
    for record in records:
        missing = [f"{kind} file {path}" for kind, path in record.files.items()
                   if not path.is_file()]
        if missing:
            problems.append(f"sample {record.id} is missing {missing[0]}")
        else:
            good.append(record)
    if problems and not skip_bad:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DatasetError(f"{dataset}: {problems[0]}{more}; restore the files "
                           "or pass --skip-bad to skip incomplete samples")
    for problem in problems:
        log.warning("skipping: %s", problem)
    return good


def find_undecodable(records: list[Record], decode: Decoder, dataset: str,
                     workers: int | None = None) -> list[tuple[Record, str]]:
    """Decode every record once (threaded, with progress) and return the failures."""
    def attempt(record: Record) -> str | None:
        try:
            decode(record)
        except DatasetError as exc:
            return str(exc)
        return None

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        results = list(progress(pool.map(attempt, records), total=len(records),
                                desc=f"checking {dataset}", unit="sample",
                                enabled=len(records) >= 50, leave=False))
    return [(r, problem) for r, problem in zip(records, results, strict=True)
            if problem is not None]


def finish(name: str, records: list[Record], decode: Decoder, classes: Sequence[str],
           modalities: Sequence[str], skip_bad: bool) -> SampleSequence:
    """Common tail of every reader: existence check, optional full check, the sequence."""
    records = check_files(records, skip_bad, name)
    if skip_bad:
        bad = find_undecodable(records, decode, name)
        for record, problem in bad:
            log.warning("skipping %s: %s", record.id, problem)
        dropped = {r.id for r, _ in bad}
        records = [r for r in records if r.id not in dropped]
    if not records:
        raise DatasetError(f"{name}: no samples left after filtering; check --split, "
                           "--condition, --case and the root")
    return SampleSequence(name, records, decode, classes, modalities)


def as_list(value: str | Sequence[str] | None) -> list[str] | None:
    """Accept 'a,b', ['a', 'b'] or None for the filter options."""
    if value is None:
        return None
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def check_label_range(raw: np.ndarray, valid: np.ndarray, path: Path, expected: str) -> None:
    """Fail naming the file when a label holds values outside the class range."""
    bad = np.unique(raw[~valid[raw]])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:8])
        raise DatasetError(f"label {path} has values outside {expected}: {shown}; "
                           "the file is not a label of this dataset or is damaged")
