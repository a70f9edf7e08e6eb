"""Presets under `configs/`: plain YAML data that the CLI reads for its defaults.

The folder is looked up in `$ANY2SEG_CONFIGS`, then `./configs`, then next to the
installed package (an editable install or a source checkout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import PipelineError


def configs_dir() -> Path | None:
    candidates = []
    if os.environ.get("ANY2SEG_CONFIGS"):
        candidates.append(Path(os.environ["ANY2SEG_CONFIGS"]))
    candidates += [Path.cwd() / "configs", Path(__file__).resolve().parents[1] / "configs"]
    for path in candidates:
        if path.is_dir():
            return path
    return None


def load_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping, naming the file in any error."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PipelineError(f"config {path} must hold a mapping, got {type(data).__name__}")
    return data


def preset(kind: str, name: str) -> dict[str, Any]:
    """`configs/<kind>/<name>.yaml`, or {} when there is no such preset."""
    base = configs_dir()
    if base is None:
        return {}
    path = base / kind / f"{name}.yaml"
    return load_yaml(path) if path.is_file() else {}


def load_params(path: Path | str | None = None) -> dict[str, Any]:
    """`params.yaml` (the DVC parameters file) as a dict; {} when there is none."""
    path = Path(path) if path is not None else Path("params.yaml")
    return load_yaml(path) if path.is_file() else {}


def build(cls: type, data: dict[str, Any], source: str) -> Any:
    """Instantiate a config dataclass from plain data, refusing unknown keys and wrong types
    with a message that names `source` and the key."""
    import dataclasses
    import typing

    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise PipelineError(f"{source}: unknown key {unknown[0]!r}; known keys: "
                            f"{', '.join(sorted(fields))}")
    values = {}
    for key, value in data.items():
        expected = hints[key]
        if not _type_ok(value, expected):
            raise PipelineError(f"{source}: {key} must be {_type_name(expected)}, got "
                                f"{value!r}")
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


def _type_name(expected: Any) -> str:
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
