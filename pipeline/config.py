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
