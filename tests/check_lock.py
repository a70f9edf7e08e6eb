"""Is requirements.lock the environment pyproject.toml asks for, and is it installed?

Run by `make test` before ruff and pytest, so a dependency added to pyproject.toml but not
to the lock (or the reverse) fails CI in one line instead of on the next machine:

    python tests/check_lock.py [--pyproject pyproject.toml] [--lock requirements.lock]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

DIRECT = "any2seg-pipeline (pyproject.toml)"
FIX = "run `make lock` and commit requirements.lock"


LOCKED_EXTRAS = ("dev", "export")  # the extras the Makefile's LOCK_FLAGS name


def declared(pyproject: Path, extras: tuple[str, ...] = LOCKED_EXTRAS
             ) -> dict[str, Requirement]:
    """Direct requirements of the project (core and the named extras) by canonical name."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines += project.get("optional-dependencies", {}).get(extra, [])
    reqs = [Requirement(line) for line in lines]
    return {canonicalize_name(r.name): r for r in reqs if r.marker is None or r.marker.evaluate()}


def locked(lock: Path) -> tuple[dict[str, str], set[str]]:
    """Pins of a pip-compile lock ({name: version}) and the names it marks as direct."""
    pins: dict[str, str] = {}
    direct: set[str] = set()
    current = None
    for raw in lock.read_text().splitlines():
        line = raw.strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line.split(" ")[0])
        if match and not raw.startswith((" ", "#")):
            current = canonicalize_name(match.group(1))
            pins[current] = match.group(2)
        elif line.startswith("#") and DIRECT in line and current is not None:
            direct.add(current)
        elif raw and not raw.startswith((" ", "#")) and not raw.startswith("-"):
            raise ValueError(f"{lock}: cannot read the line {raw!r} (expected NAME==VERSION)")
    return pins, direct


def problems(pyproject: Path, lock: Path, check_installed: bool = True) -> list[str]:
    """Every disagreement, most useful first; empty when all is well."""
    want = declared(pyproject)
    pins, direct = locked(lock)
    out = []
    for name, req in sorted(want.items()):
        if name not in pins:
            out.append(f"{pyproject} requires {req} but {lock} does not pin {name}; {FIX}")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            out.append(f"{lock} pins {name}=={pins[name]}, outside {pyproject}'s {req}; {FIX}")
    for name in sorted(direct - set(want)):
        out.append(f"{lock} pins {name} as a direct dependency but {pyproject} no longer "
                   f"requires it; {FIX}")
    if check_installed and not out:
        for name, version in sorted(pins.items()):
            try:
                have = metadata.version(name)
            except metadata.PackageNotFoundError:
                have = None
            if have is None or Version(have) != Version(version):
                out.append(f"{name} {have or 'is not installed'} in this environment but "
                           f"{lock} pins {version}; run `make setup` (delete "
                           ".venv/.any2seg-installed first if it says nothing to do)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--no-installed", action="store_true",
                        help="compare the files only, not this environment")
    args = parser.parse_args(argv)
    try:
        found = problems(args.pyproject, args.lock, not args.no_installed)
    except (OSError, ValueError, KeyError) as exc:
        found = [f"cannot compare {args.pyproject} and {args.lock}: {exc}"]
    for line in found[:1]:
        print(f"error: {line}" + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""),
              file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
