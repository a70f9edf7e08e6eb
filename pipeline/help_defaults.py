"""`--help` defaults that are the values a run will use, and say where they come from.

A flag left unset takes its value from the parameters file when it sets the key (the file
`--params` names on the same command line, else ./params.yaml), else from the config
dataclass, the one home of every built-in default; help text written by hand drifted from
both (it promised batch 8 where params.yaml ran 4). `Tunable` looks the value up when help
is drawn; `GROUPS` says which dataclass holds each params.yaml group
(tests/application/test_defaults.py walks it to check that params.yaml states the built-in
defaults).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from any2seg.config import load_params, read_params
from any2seg.errors import PipelineError

# params.yaml group (dotted for a nested one) -> (module, dataclass, {params key: field}
# where they differ)
GROUPS = {
    "dataset": ("stages.teacher.config", "TeacherConfig", {"name": "dataset"}),
    "dataset.sample": ("any2seg.synth.write", "SampleSpec", {}),
    "teacher": ("stages.teacher.config", "TeacherConfig", {"root": "teacher_root"}),
    "teacher.fit": ("stages.teacher.default.config", "FitConfig", {}),
    "student": ("stages.student.model", "StudentConfig", {}),
    "student.mff": ("stages.student.mff", "MFFConfig", {}),
    "train": ("stages.student.config", "TrainConfig", {}),
    "train.loss": ("stages.student.losses", "LossConfig", {}),
    "train.augment": ("stages.student.data", "AugmentConfig", {}),
    "eval": ("stages.student.eval_config", "EvalConfig", {}),
    "codealign": ("stages.student.codealign.config", "CodeAlignConfig", {}),
}


def group_field(key: str) -> dataclasses.Field[Any]:
    """The dataclass field that holds a dotted params key (`train.loss.w_cr`)."""
    group, name = key.rsplit(".", 1)
    if group not in GROUPS:
        raise KeyError(f"no config dataclass holds params group {group!r} (of {key})")
    module, cls_name, renames = GROUPS[group]
    cls = getattr(importlib.import_module(module), cls_name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return fields[renames.get(name, name)]


def dataclass_default(key: str) -> Any:
    """The built-in default of a dotted params key (`train.batch_size`)."""
    field = group_field(key)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def params_argument(args: list[str]) -> Path | None:
    """The file a command line names with `--params FILE` / `--params=FILE`, if any."""
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--params" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return None


def used_default(key: str, path: Path | None = None) -> tuple[Any, str]:
    """(value, where from) for a key whose flag is not given, as a run resolves it: the
    parameters file (`path`, else ./params.yaml) first, then the dataclass. A named file
    that is missing or broken is an error, as it is for a run."""
    if path is not None:
        node, source = read_params(path)
    else:
        source = "params.yaml"
        try:
            node = load_params()
        except PipelineError:
            node = {}
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return dataclass_default(key), "built-in default"
        node = node[part]
    return node, f"{source}: {key}"


def shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return str(value)


class ParamsCommand(click.Command):
    """A command whose `--help` reads its defaults from the file its own command line names
    with `--params` (in any order with `--help`), as a run of it would."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["params_path"] = params_argument(args)
        return super().parse_args(ctx, args)


class Tunable(click.Option):
    """An option whose help default is read from the parameters file / the dataclass
    (`key`); `fallback` is shown instead of the dataclass's None when the file is silent."""

    def __init__(self, *args: Any, key: str, fallback: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key = key
        self.fallback = fallback

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        value, source = used_default(self.key, ctx.meta.get("params_path"))
        if self.fallback is not None and source == "built-in default":
            extra["default"] = self.fallback
        else:
            extra["default"] = f"{shown(value)} ({source})"
        return extra


class Derived(click.Option):
    """An option whose default is computed from its one home when it is needed (at parse
    or help time), never written out again beside the option."""

    def __init__(self, *args: Any, compute: Callable[[], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.compute = compute

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        return self.compute()

    def get_help_extra(self, ctx: click.Context) -> Any:
        extra = super().get_help_extra(ctx)
        extra["default"] = str(self.compute())
        return extra
