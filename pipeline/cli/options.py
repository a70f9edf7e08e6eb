"""What the commands share: the click context settings, parameter types whose choices come
from the registries (read only when needed, so start-up imports nothing heavy), the common
options, and the command line itself (for `--nproc` to restart it once per rank)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from any2seg.devices import DEVICE_FORMS, is_device

_ARGV: list[str] | None = None  # the command line, for `--nproc` to start it once per rank
CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"], "max_content_width": 100,
           "terminal_width": 100}


class Registered(click.ParamType):
    """A closed set of names read from a registry when they are needed (for `--help` or a
    value to check), so help lists what is registered and start-up imports nothing heavy.

    `accepts` replaces membership for open families such as `cuda:N` or `timm:NAME`."""

    name = "choice"

    def __init__(self, names: Callable[[], Sequence[str]],
                 accepts: Callable[[str], bool] | None = None) -> None:
        self.names = names
        self.accepts = accepts

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        ok = self.accepts(value) if self.accepts else value in self.names()
        if not ok:
            self.fail(f"{value!r} is not one of {', '.join(self.names())}", param, ctx)
        return value


def _datasets() -> list[str]:
    from any2seg import datasets

    return datasets.available()


def _captioners() -> list[str]:
    from stages.teacher import captioners

    return captioners.available()


def _backbones() -> list[str]:
    from stages.student.encoder import backbone_names

    return backbone_names()


def _is_backbone(name: str) -> bool:
    from stages.student.encoder import is_backbone

    return is_backbone(name)


def _store_dtypes() -> list[str]:
    from stages.teacher.config import STORE_DTYPES

    return list(STORE_DTYPES)


def _settings() -> list[str]:
    from stages.student.eval_config import SETTINGS

    return [*SETTINGS, "all"]


def _modes() -> list[str]:
    from stages.student.eval_config import INFERENCE_MODES

    return list(INFERENCE_MODES)


def _protocols() -> list[str]:
    from stages.student.protocol import PROTOCOLS

    return list(PROTOCOLS)


def _missing_modes() -> list[str]:
    from stages.student.model import MISSING_MODES

    return list(MISSING_MODES)


DATASET = Registered(_datasets)
DEVICE = Registered(lambda: DEVICE_FORMS, is_device)
CAPTIONER = Registered(_captioners)
STORE_DTYPE = Registered(_store_dtypes)
BACKBONE = Registered(_backbones, _is_backbone)
SETTING = Registered(_settings)
MODE = Registered(_modes)
PROTOCOL = Registered(_protocols)
MISSING_MODE = Registered(_missing_modes)


class LimitType(click.ParamType):
    """`--limit N` (>= 1 is checked with the config) or `--limit all`, which overrides a
    params.yaml `eval.limit` with every sample."""

    name = "N|all"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if value == ALL:
            return ALL
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer or all", param, ctx)


ALL = "all"  # LimitType's value for `all` (not a number: `--limit -1` is checked as one)


DATASET_OPTION = click.option("--dataset", type=DATASET, required=True,
                              help="A registered dataset format.")
ROOT = click.option("--root", type=click.Path(path_type=Path), default=None,
                    help="Dataset folder (default: the root in configs/datasets/NAME.yaml).")


def params_root() -> Callable[[Any], Any]:
    """`--root` of a command that reads `dataset.root` from its parameters file first."""
    from pipeline.help_defaults import Tunable

    return click.option("--root", type=click.Path(path_type=Path), default=None,
                        help="Dataset folder; a --dataset other than the parameters file's "
                        "dataset.name reads the root in configs/datasets/NAME.yaml.",
                        cls=Tunable, key="dataset.root",
                        fallback="the root in configs/datasets/NAME.yaml")
PARAMS = click.option("--params", "params_path", type=click.Path(path_type=Path), default=None,
                      help="Parameters file.  [default: ./params.yaml if present]")


def flags(overrides: dict[str, Any], aliases: dict[str, str] | None = None) -> dict[str, str]:
    """The flag each overridden config field came from, for errors that name it."""
    aliases = aliases or {}
    return {key: aliases.get(key, "--" + key.replace("_", "-"))
            for key, value in overrides.items() if value is not None}


def pairs(values: tuple[str, ...], flag: str) -> dict[str, str]:
    """Repeated NAME=VALUE options as a dict."""
    out = {}
    for value in values:
        key, sep, val = value.partition("=")
        if not sep or not key or not val:
            raise click.BadParameter(f"expected NAME=VALUE, got {value!r}", param_hint=flag)
        out[key.strip()] = val.strip()
    return out


def option_value(text: str) -> Any:
    """A KEY=VALUE option's value, read as YAML (true, 3, [a, b] ...)."""
    import yaml

    return yaml.safe_load(text)


def remember_argv(args: list[str]) -> None:
    """Keep the command line `main` was given, for `argv()`."""
    global _ARGV
    _ARGV = args


def argv() -> list[str]:
    """The command line (without the program), as `main` was given it."""
    return list(_ARGV if _ARGV is not None else sys.argv[1:])


def debug() -> bool:
    """Whether `pipeline --debug` was given."""
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().obj and ctx.find_root().obj.get("debug"))
