"""Presets under `configs/`: plain YAML data that the CLI reads for its defaults.

The folder is looked up in `$ANY2SEG_CONFIGS`, then `./configs`, then beside the package
(a source checkout or an editable install), then inside it (`any2seg/configs`, where a
wheel installs the top-level `configs/`: see setup.py).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml

from any2seg.errors import PipelineError

# the data set a command reads when neither a flag nor the parameters file names one: the
# embedded, generated sample (configs/datasets/sample.yaml)
DEFAULT_DATASET = "sample"


def configs_dir() -> Path | None:
    candidates = []
    if os.environ.get("ANY2SEG_CONFIGS"):
        candidates.append(Path(os.environ["ANY2SEG_CONFIGS"]))
    here = Path(__file__).resolve().parent
    candidates += [Path.cwd() / "configs", here.parent / "configs", here / "configs"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


def yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """One line, `FILE:LINE:COLUMN: invalid YAML: problem (context, from LINE:COLUMN)`, as
    editors and compilers print it (1-based, where YAML's marks count from 0), so the line
    and column the parser reported survive; the parser's own message spans several lines."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and cmark is not None and (mark is None or cmark.line != mark.line
                                          or cmark.column != mark.column):
        context = f"{context} from {cmark.line + 1}:{cmark.column + 1}"
    return f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping, naming the file in any error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(yaml_error(path, exc)) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PipelineError(f"config {path} must hold a mapping, got {type(data).__name__}")
    return data


def preset_path(kind: str, name: str) -> Path | None:
    """`configs/<kind>/<name>.yaml` where it exists, else None."""
    base = configs_dir()
    path = None if base is None else base / kind / f"{name}.yaml"
    return path if path is not None and path.is_file() else None


def preset(kind: str, name: str) -> dict[str, Any]:
    """`configs/<kind>/<name>.yaml`; a missing one is an error naming what there is (an
    installation without its presets must not run on silent defaults)."""
    path = preset_path(kind, name)
    if path is not None:
        return load_yaml(path)
    base = configs_dir()
    if base is None:
        raise PipelineError(f"no presets folder: neither $ANY2SEG_CONFIGS, ./configs nor the "
                            f"installed package's configs/ exists, so preset {kind}/{name} "
                            "cannot be read; reinstall any2seg-pipeline or set ANY2SEG_CONFIGS")
    known = sorted(p.stem for p in (base / kind).glob("*.yaml"))
    raise PipelineError(f"no preset {base / kind / name}.yaml; {kind} presets: "
                        f"{', '.join(known) or 'none'}")


def dataset_root(dataset: str, root: str | Path | None) -> Path:
    """The one rule for a dataset's folder: the root given (flag or params.yaml's
    dataset.root), else the root of configs/datasets/DATASET.yaml, else the reader's."""
    from any2seg import datasets

    if root:
        return Path(root)
    if preset_path("datasets", dataset) is not None:
        found = preset("datasets", dataset).get("root")
        if found:
            return Path(found)
    return Path(datasets.get(dataset).default_root)


def load_params(path: Path | str | None = None) -> dict[str, Any]:
    """`params.yaml` (the DVC parameters file) as a dict; {} when there is none."""
    path = Path(path) if path is not None else Path("params.yaml")
    return load_yaml(path) if path.is_file() else {}


def read_params(path: Path | None) -> tuple[dict[str, Any], str]:
    """The parameters file a command was given (`--params`), or ./params.yaml when present,
    with the name its errors use; a named file that does not exist is refused."""
    if path is not None and not path.is_file():
        raise PipelineError(f"parameters file {path} does not exist")
    return load_params(path), str(path or "params.yaml")


def apply_overrides(overrides: Mapping[str, Any], *configs: Any) -> None:
    """The command line over the parameters file, for every config built from one: each
    value given (not None) replaces the field of the first of `configs` that has it, an
    unknown name is refused. A dataset other than the file's drops the file's root (the
    file's `dataset.root` belongs to the file's `dataset.name`)."""
    import dataclasses

    first = configs[0]
    if overrides.get("dataset") not in (None, getattr(first, "dataset", None)) and \
            overrides.get("root") is None and hasattr(first, "root"):
        first.root = None
    for key, value in overrides.items():
        if value is None:
            continue
        owner = next((c for c in configs
                      if key in {f.name for f in dataclasses.fields(c)}), None)
        if owner is None:
            raise PipelineError(f"unknown option {key}")
        setattr(owner, key, value)


class Where:
    """Names a config value the way the user set it, for one-line errors:
    `params.yaml: train.crop` for a parameters-file value, `--crop` for a flag.

    `flags` maps the fields set on the command line to their flags; `keys` maps fields that
    live elsewhere in params.yaml to their dotted key (`root` -> `dataset.root`)."""

    def __init__(self, group: str, source: str | None = "params.yaml",
                 flags: Mapping[str, str] | None = None,
                 keys: Mapping[str, str] | None = None) -> None:
        self.group = group
        self.source = source
        self.flags = dict(flags or {})
        self.keys = dict(keys or {})

    def key(self, name: str) -> str:
        if name in self.flags:
            return self.flags[name]
        dotted = self.keys.get(name) or (f"{self.group}.{name}" if self.group else name)
        return f"{self.source}: {dotted}" if self.source else dotted

    def sub(self, name: str) -> Where:
        """The nested group `name` (e.g. train -> train.loss); flags do not reach into it."""
        return Where(f"{self.group}.{name}" if self.group else name, self.source)

    def fail(self, name: str, rule: str, value: Any) -> NoReturn:
        raise PipelineError(f"{self.key(name)} must be {rule}, got {value!r}")

    def integer(self, name: str, value: Any, lo: int, hi: int | None = None,
                why: str = "") -> None:
        """`lo <= value (<= hi)`; `why` says where the bound comes from."""
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or \
                (hi is not None and value > hi):
            rule = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
            self.fail(name, rule + (f" ({why})" if why else ""), value)

    def number(self, name: str, value: Any, lo: float | None = None, hi: float | None = None,
               lo_open: bool = False, hi_open: bool = False, why: str = "") -> None:
        """A finite number in the interval; `lo_open`/`hi_open` exclude the ends."""
        ok = isinstance(value, int | float) and not isinstance(value, bool) and \
            math.isfinite(value)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            self.fail(name, "a finite number" + _interval(lo, hi, lo_open, hi_open) +
                      (f" ({why})" if why else ""), value)

    def one_of(self, name: str, value: Any, choices: Iterable[Any]) -> None:
        choices = list(choices)
        if value not in choices:
            self.fail(name, "one of " + ", ".join(str(c) for c in choices), value)


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is None and hi is None:
        return ""
    if hi is None:
        return f" {'>' if lo_open else '>='} {lo}"
    if lo is None:
        return f" {'<' if hi_open else '<='} {hi}"
    return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def build(cls: type, data: dict[str, Any], where: Where | str) -> Any:
    """Instantiate a config dataclass from plain data, refusing unknown keys and wrong types
    with a message that names the file and the key (`where`, or a group name)."""
    import dataclasses
    import typing

    where = Where(where, None) if isinstance(where, str) else where
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise PipelineError(f"{where.source + ': ' if where.source else ''}{where.group} must "
                            f"be a mapping of keys to values, got {data!r}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where.source}: {where.group}" if where.source else where.group
        raise PipelineError(f"{prefix}: unknown key {unknown[0]!r}; known keys: "
                            f"{', '.join(sorted(fields))}")
    values = {}
    for key, value in data.items():
        expected = hints[key]
        if not _type_ok(value, expected):
            where.fail(key, _type_name(expected), value)
        values[key] = value
    return cls(**values)


def _type_ok(value: Any, expected: Any) -> bool:
    import types
    import typing

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(expected))
    if expected is type(None):
        return value is None
    if expected is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(expected) or (Any, Any)
        return isinstance(value, dict) and all(_type_ok(a, k) and _type_ok(b, v)
                                               for a, b in value.items())
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
          type(None): "null"}


def _type_name(expected: Any) -> str:
    """`int | None` -> 'an integer or null', `list[float]` -> 'a list of numbers'."""
    import types
    import typing

    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if origin is list:
        (item,) = typing.get_args(expected) or (Any,)
        inner = _type_name(item).removeprefix("an ").removeprefix("a ")
        return "a list" if item is Any else f"a list of {inner}s"
    if origin is dict or expected is dict:
        return "a mapping"
    return _NAMES.get(expected) or getattr(expected, "__name__", None) or str(expected)
