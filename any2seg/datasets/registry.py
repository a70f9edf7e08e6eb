"""Dataset registry: users add a reader with `@register` and every command can use it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from any2seg.datasets.base import Record, Sample, SampleSequence
from any2seg.errors import DatasetError


class DatasetReader(ABC):
    """A dataset format: its classes, modalities and how to index and decode a root."""

    name: str = ""
    classes: ClassVar[tuple[str, ...]] = ()
    palette: ClassVar[tuple[tuple[int, int, int], ...]] = ()
    modalities: ClassVar[tuple[str, ...]] = ()
    splits: ClassVar[tuple[str, ...]] = ("train", "val", "test")
    default_root: str = ""
    ignore_index: ClassVar[int] = 255
    # values of the `depth_source` load option, for formats that store depth twice
    depth_sources: ClassVar[tuple[str, ...]] = ()
    # `index` options under which each split names its own files (for `datasets check`)
    every_file_options: ClassVar[dict[str, Any]] = {}
    # the files a root holds, relative to it (for errors about a root without samples)
    layout: ClassVar[str] = ""
    # evaluation protocol used when none is asked for ("official" or "native"), and the
    # short side the official evaluation resizes images and labels to (None: no resize)
    eval_protocol: str = "native"
    official_eval_size: ClassVar[int | None] = None

    @abstractmethod
    def index(self, root: Path, split: str | Sequence[str], **options: Any) -> list[Record]:
        """Where every sample of `split` lives, in a fixed order, without decoding."""

    @abstractmethod
    def decode(self, record: Record) -> Sample:
        """Read one record's files into a `Sample`, raising `DatasetError` naming the file."""

    def decode_inputs(self, files: dict[str, Path]) -> dict[str, np.ndarray]:
        """One frame's images {modality: file} without a label, as `decode` makes them
        (prediction on new frames). Formats that can only place a frame by its label
        refuse."""
        raise DatasetError(f"{self.name} frames can be read only with their labels, from a "
                           f"{self.name} root (--dataset {self.name} --root ...)")

    @abstractmethod
    def load(self, root: Path | str | None, split: str | Sequence[str],
             **options: Any) -> SampleSequence:
        """A lazy sequence of samples; `skip_bad=True` drops broken ones with a warning."""

    @abstractmethod
    def info(self, root: Path | str | None) -> dict[str, Any]:
        """Class names and counts per split, condition and case."""

    def pack_index(self, root: Path, split: str, modalities: Sequence[str] | None = None
                   ) -> tuple[list[list[Record]], list[Path]]:
        """What `pipeline pack` stores of `split`: lists of records (the same ids in the same
        order) that together name every file a load with any option reads, and the small
        files the reader indexes with (split lists). A reader whose `index` reaches files
        only through its root's pathlib methods (`/`, `is_dir`, `iterdir`, `read_text`) and
        `decode` through `any2seg.datasets.decode` can then read its packs unchanged."""
        options = dict(self.every_file_options)
        if modalities is not None:
            options["modalities"] = list(modalities)
        return [self.index(root, split, **options)], []


_REGISTRY: dict[str, DatasetReader] = {}


def register(reader: DatasetReader) -> DatasetReader:
    """Add a reader instance under its `name` (later registrations replace earlier ones)."""
    if not reader.name:
        raise ValueError("a dataset reader needs a name")
    _REGISTRY[reader.name] = reader
    return reader


def get(name: str) -> DatasetReader:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None


def available() -> list[str]:
    return sorted(_REGISTRY)
