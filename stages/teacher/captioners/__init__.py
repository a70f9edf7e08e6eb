"""Captioners: scene descriptions for the teacher's E_S, behind one small registry.

A captioner turns a batch of `Sample`s into strings. Add one by subclassing
`Captioner` and decorating it with `@register`; `pipeline cache-teacher --captioner
NAME` then finds it, and its `fingerprint()` enters the cache's teacher fingerprint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from any2seg.datasets import Sample
from any2seg.errors import PipelineError


class Captioner(ABC):
    """Batched `caption(samples) -> list[str]`; constructed once per process."""

    name: ClassVar[str] = ""

    def __init__(self, class_names: Sequence[str], **options: Any) -> None:
        self.class_names = list(class_names)
        self.options = dict(options)

    @abstractmethod
    def caption(self, samples: Sequence[Sample]) -> list[str]:
        """One description per sample, in order."""

    def fingerprint(self) -> dict[str, Any]:
        """What makes this captioner's output what it is (enters the cache fingerprint)."""
        return {"name": self.name, **{k: self.options[k] for k in sorted(self.options)}}


_REGISTRY: dict[str, type[Captioner]] = {}


def register(cls: type[Captioner]) -> type[Captioner]:
    if not cls.name:
        raise ValueError("a captioner needs a name")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, class_names: Sequence[str], **options: Any) -> Captioner:
    """Instantiate a registered captioner; unknown names and options fail clearly."""
    if name not in _REGISTRY:
        raise PipelineError(f"unknown captioner {name!r}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](class_names, **options)
    except TypeError as exc:
        raise PipelineError(f"captioner {name!r}: {exc}") from exc


# the shipped captioners register themselves (heavy imports happen on first use)
from stages.teacher.captioners import hf, llama_adapter, template  # noqa: E402,F401
