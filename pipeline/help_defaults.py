"""`--help` defaults that are the values a run will use, and say where they come from.

A flag left unset takes its value from ./params.yaml when that file sets the key, else
from the config dataclass; help text written by hand drifted from both (it promised batch
8 where params.yaml ran 4). `Tunable` looks the value up when help is drawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from any2seg.config import load_params
from any2seg.errors import PipelineError

# params.yaml group -> (module, dataclass, {params key: field} where they differ)
GROUPS = {
    "train": ("stages.student.config", "TrainConfig", {}),
    "student": ("stages.student.model", "StudentConfig", {}),
    "eval": ("stages.student.evaluate", "EvalConfig", {}),
    "teacher": ("stages.teacher.config", "TeacherConfig", {"root": "teacher_root"}),
    "dataset": ("stages.teacher.config", "TeacherConfig", {"name": "dataset"}),
}


def dataclass_default(key: str) -> Any:
    """The built-in default of a dotted params key (`train.batch_size`)."""
    import importlib

    group, name = key.split(".", 1)
    module, cls_name, renames = GROUPS[group]
    cls = getattr(importlib.import_module(module), cls_name)
    field = {f.name: f for f in dataclasses.fields(cls)}[renames.get(name, name)]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def used_default(key: str) -> tuple[Any, str]:
    """(value, where from) for a key whose flag is not given, as a run in this folder
    resolves it: ./params.yaml first, then the dataclass."""
    try:
        node: Any = load_params()
    except PipelineError:
        node = {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return dataclass_default(key), "built-in default"
        node = node[part]
    return node, f"params.yaml: {key}"


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return str(value)


class Tunable(click.Option):
    """An option whose help default is read from params.yaml / the dataclass (`key`)."""

    def __init__(self, *args: Any, key: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        value, source = used_default(self.key)
        extra["default"] = f"{shown(value)} ({source})"
        return extra
