"""The teacher cache: one zarr v3 group per dataset/teacher pairing.

Arrays (names are the public schema; other tools read them):
  sample_id (N,) str      caption (N,) str      done (N,) bool
  scene (N, D)            visual/<modality> (N, D)
  classes (K, D)          class_names (K,) str
Attributes: schema_version, teacher_fingerprint, dataset_fingerprint, dim, dtype, plus
format, modalities, rows_per_shard, state, created, updated.

Rows are grouped in shards of `rows_per_shard`; one shard is one file per array and
is always written whole by one writer, data first and `done` last. zarr writes files
atomically (temporary file + rename), so a run killed at any instant leaves each shard
either absent or complete, and a rerun recomputes exactly the shards whose rows are not
`done`. Writers hold an exclusive `flock` on `<store>/.lock` for the whole run.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError

FORMAT = "any2seg-teacher-cache"
SCHEMA_VERSION = 1
LOCK_NAME = ".lock"
DTYPES = ("float16", "float32")


def dataset_fingerprint(ids: Sequence[str]) -> str:
    """Hash of the ordered sample ids: the rows' identity, independent of where data lives."""
    h = hashlib.sha256()
    for sample_id in ids:
        h.update(sample_id.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def _zarr():
    import warnings

    import zarr

    warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
    warnings.filterwarnings("ignore", message=".*StringDType.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    return zarr


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _diff(stored: Any, requested: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the leaves where two nested dicts differ."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested)):
            out += _diff(stored.get(key), requested.get(key), f"{prefix}{key}.")
        return out
    if stored != requested:
        def show(v: Any) -> str:
            return "absent" if v is None else "set" if isinstance(v, dict) else json.dumps(v)

        return [f"{prefix[:-1]} ({show(stored)} in the store, {show(requested)} now)"]
    return []


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the store for one run; released by the kernel even on SIGKILL."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise PipelineError(f"{path} is being written by {holder}; wait for it to finish "
                                "(two writers on one store are refused)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)


@dataclass
class StoreSpec:
    """What a run asks of a store; compared with what an existing store holds."""

    ids: list[str]
    modalities: list[str]
    teacher_fingerprint: dict[str, Any]
    dtype: str = "float16"
    rows_per_shard: int = 64

    @property
    def dataset_fingerprint(self) -> str:
        return dataset_fingerprint(self.ids)


class CacheWriter:
    """Creates, validates and fills a store. Used by stage one only."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self.group = group
        self.attrs = dict(group.attrs)
        self.n = int(group["sample_id"].shape[0])
        self.rows_per_shard = int(self.attrs["rows_per_shard"])
        self.modalities = list(self.attrs["modalities"])

    # -- opening ----------------------------------------------------------------------
    @staticmethod
    def _is_ours(path: Path) -> bool | None:
        """True: our store; False: something else; None: empty or an interrupted creation."""
        entries = {p.name for p in path.iterdir()} - {LOCK_NAME} if path.is_dir() else set()
        entries = {e for e in entries if not e.endswith(".partial")}
        if not entries:
            return None
        meta = path / "zarr.json"
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, json.JSONDecodeError):
            return None if entries == {"zarr.json"} else False
        if attrs.get("format") != FORMAT:
            return False
        return None if attrs.get("state") != "ready" else True

    @classmethod
    def check(cls, path: Path, spec: StoreSpec, overwrite: bool = False) -> CacheWriter | None:
        """The existing store if it matches `spec`; None when a new one must be created.

        Refuses a foreign folder, a store from another teacher or sample list, or another
        dtype, naming the difference; `overwrite` allows replacing our own stores only.
        """
        if path.exists() and not path.is_dir():
            raise PipelineError(f"{path} exists and is not a directory; choose another --out")
        ours = cls._is_ours(path) if path.exists() else None
        if ours is False:
            raise PipelineError(f"{path} exists and is not a teacher cache; refusing to write "
                                "into it: choose another --out or remove it yourself")
        if ours is None:
            return None
        group = _zarr().open_group(str(path), mode="r+")
        writer = cls(path, group)
        problems = []
        if writer.attrs.get("schema_version") != SCHEMA_VERSION:
            problems.append(f"schema version {writer.attrs.get('schema_version')} "
                            f"(this version writes {SCHEMA_VERSION})")
        if writer.attrs["dataset_fingerprint"] != spec.dataset_fingerprint:
            problems.append(f"another sample list ({writer.n} samples, fingerprint "
                            f"{writer.attrs['dataset_fingerprint']} in the store; "
                            f"{len(spec.ids)} samples, {spec.dataset_fingerprint} now)")
        teacher = _diff(writer.attrs["teacher_fingerprint"], spec.teacher_fingerprint)
        if teacher:
            problems.append("another teacher: " + "; ".join(teacher[:4]))
        if writer.attrs["dtype"] != spec.dtype:
            problems.append(f"dtype {writer.attrs['dtype']} (requested {spec.dtype})")
        if sorted(writer.modalities) != sorted(spec.modalities):
            problems.append(f"modalities {writer.modalities} (requested {spec.modalities})")
        if problems and not overwrite:
            raise PipelineError(f"{path} was built differently: {' | '.join(problems)}; pass "
                                "--overwrite to rebuild it, or choose another --out")
        if problems:
            return None
        return writer

    @classmethod
    def create(cls, path: Path, spec: StoreSpec, dim: int, class_names: Sequence[str],
               classes: np.ndarray, extra_attrs: dict[str, Any] | None = None) -> CacheWriter:
        """A new store with ids, classes and empty rows (replacing an old one of ours)."""
        if spec.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype}")
        zarr = _zarr()
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.iterdir():  # only reached for empty, interrupted or our stores
            if entry.name == LOCK_NAME:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        n, k, r = len(spec.ids), len(class_names), spec.rows_per_shard
        attrs = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "state": "creating",
            "teacher_fingerprint": spec.teacher_fingerprint,
            "dataset_fingerprint": spec.dataset_fingerprint, "dim": int(dim),
            "dtype": spec.dtype, "modalities": list(spec.modalities), "rows_per_shard": r,
            "created": _now(), "updated": _now(), **(extra_attrs or {}),
        }
        group = zarr.create_group(str(path), attributes=attrs)
        rows = (max(1, min(r, n)),)
        group.create_array("sample_id", shape=(n,), dtype=str, chunks=rows, shards=rows)
        group.create_array("caption", shape=(n,), dtype=str, chunks=rows, shards=rows)
        group.create_array("done", shape=(n,), dtype=bool, chunks=rows, shards=rows,
                           fill_value=False)
        vec = (rows[0], int(dim))
        group.create_array("scene", shape=(n, dim), dtype=spec.dtype, chunks=vec, shards=vec,
                           fill_value=0)
        for m in spec.modalities:
            group.create_array(f"visual/{m}", shape=(n, dim), dtype=spec.dtype, chunks=vec,
                               shards=vec, fill_value=0)
        kk = (max(k, 1),)
        group.create_array("classes", shape=(k, dim), dtype=spec.dtype,
                           chunks=(kk[0], int(dim)), shards=(kk[0], int(dim)), fill_value=0)
        group.create_array("class_names", shape=(k,), dtype=str, chunks=kk, shards=kk)
        group["sample_id"][:] = np.asarray(spec.ids, dtype=object).astype(str)
        group["class_names"][:] = np.asarray(list(class_names), dtype=str)
        group["classes"][:] = classes.astype(spec.dtype)
        group.attrs["state"] = "ready"
        return cls(path, zarr.open_group(str(path), mode="r+"))

    # -- rows ---------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.n // self.rows_per_shard)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.n))

    def pending_shards(self) -> list[int]:
        done = self.group["done"][:]
        return [s for s in range(self.num_shards)
                if not done[self.shard_rows(s).start:self.shard_rows(s).stop].all()]

    def write_shard(self, shard: int, captions: Sequence[str], scene: np.ndarray,
                    visual: dict[str, np.ndarray]) -> None:
        """Write one whole shard, data first and `done` last."""
        rows = self.shard_rows(shard)
        sl = slice(rows.start, rows.stop)
        n = len(rows)
        if len(captions) != n or scene.shape[0] != n or set(visual) != set(self.modalities):
            raise ValueError(f"shard {shard} needs {n} rows of {self.modalities}")
        dtype = self.attrs["dtype"]
        self.group["caption"][sl] = np.asarray(list(captions), dtype=str)
        self.group["scene"][sl] = scene.astype(dtype)
        for m in self.modalities:
            self.group[f"visual/{m}"][sl] = visual[m].astype(dtype)
        self.group["done"][sl] = np.ones(n, dtype=bool)

    def touch(self) -> None:
        self.group.attrs["updated"] = _now()

    def remove_partials(self) -> None:
        """Temporary files of writes interrupted by a kill (the targets are intact)."""
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# reading (stage two and tools)
# ---------------------------------------------------------------------------------------
class TeacherCache:
    """Read-only view of a store: teacher targets by sample id, lazily through dask."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise PipelineError(f"{self.path} is not a teacher cache (no zarr.json); build it "
                                "with `pipeline cache-teacher`")
        zarr = _zarr()
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"cannot open {self.path} as a zarr store ({exc})") from exc
        self.attrs = dict(self.group.attrs)
        self._validate()
        self.ids: list[str] = [str(s) for s in self.group["sample_id"][:]]
        self._row = {sample_id: i for i, sample_id in enumerate(self.ids)}
        self.class_names: list[str] = [str(s) for s in self.group["class_names"][:]]

    def _validate(self) -> None:
        a = self.attrs
        if a.get("format") != FORMAT:
            raise PipelineError(f"{self.path} is not a teacher cache (format {a.get('format')!r})")
        if a.get("schema_version") != SCHEMA_VERSION:
            raise PipelineError(f"{self.path} has cache schema {a.get('schema_version')}; this "
                                f"version reads {SCHEMA_VERSION}: rebuild it with "
                                "`pipeline cache-teacher --overwrite`")
        if a.get("state") != "ready":
            raise PipelineError(f"{self.path} was not fully created; rerun "
                                "`pipeline cache-teacher`")
        required = ["sample_id", "caption", "done", "scene", "classes", "class_names",
                    *(f"visual/{m}" for m in a["modalities"])]
        for name in required:
            try:
                self.group[name]
            except KeyError:
                raise PipelineError(f"{self.path} lacks the array {name}; the store is "
                                    "damaged: rebuild it with --overwrite") from None
        n, d = self.group["sample_id"].shape[0], int(a["dim"])
        for name in ("scene", *(f"visual/{m}" for m in a["modalities"])):
            if self.group[name].shape != (n, d):
                raise PipelineError(f"{self.path}: {name} has shape {self.group[name].shape}, "
                                    f"expected {(n, d)}")
        if self.group["classes"].shape[1] != d:
            raise PipelineError(f"{self.path}: classes has dim {self.group['classes'].shape[1]}, "
                                f"expected {d}")

    # -- metadata -----------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.attrs["modalities"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def dataset_fingerprint(self) -> str:
        return str(self.attrs["dataset_fingerprint"])

    @property
    def teacher_fingerprint(self) -> dict[str, Any]:
        return dict(self.attrs["teacher_fingerprint"])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    # -- lazy arrays ----------------------------------------------------------------------
    def _dask(self, name: str) -> Any:
        import dask.array as da

        return da.from_zarr(self.group[name])

    @property
    def scene(self) -> Any:
        """E_S for every row, (N, D) dask array."""
        return self._dask("scene")

    def visual(self, modality: str) -> Any:
        """E_m for every row, (N, D) dask array."""
        if modality not in self.modalities:
            raise PipelineError(f"{self.path} has no modality {modality!r}; it holds "
                                f"{', '.join(self.modalities)}")
        return self._dask(f"visual/{modality}")

    @property
    def classes(self) -> np.ndarray:
        """E_C, (K, D) float32 (small; read eagerly)."""
        return np.asarray(self.group["classes"][:], dtype=np.float32)

    def captions(self, sample_ids: Sequence[str] | None = None) -> list[str]:
        rows = self.rows(sample_ids) if sample_ids is not None else slice(None)
        return [str(c) for c in np.asarray(self.group["caption"][:])[rows]]

    # -- by sample id -----------------------------------------------------------------------
    def rows(self, sample_ids: Sequence[str]) -> np.ndarray:
        missing = [s for s in sample_ids if s not in self._row]
        if missing:
            raise PipelineError(f"{self.path} has no rows for {len(missing)} samples (e.g. "
                                f"{missing[0]}); rebuild the cache for this dataset/split")
        return np.asarray([self._row[s] for s in sample_ids], dtype=np.int64)

    def require(self, sample_ids: Sequence[str]) -> None:
        """Refuse when any of `sample_ids` is absent or not yet computed."""
        rows = self.rows(sample_ids)
        not_done = rows[~self.done[rows]]
        if not_done.size:
            raise PipelineError(f"{self.path}: {not_done.size} of {rows.size} rows are not "
                                f"computed yet (e.g. {self.ids[not_done[0]]}); finish stage "
                                "one with `pipeline cache-teacher`")

    def get(self, sample_ids: Sequence[str],
            modalities: Sequence[str] | None = None) -> dict[str, Any]:
        """{"scene": (n, D), "visual": {m: (n, D)}} as float32 numpy for these samples."""
        import dask

        rows = self.rows(sample_ids)
        mods = list(modalities) if modalities is not None else self.modalities
        lazy = {"scene": self.scene[rows], **{m: self.visual(m)[rows] for m in mods}}
        (computed,) = dask.compute(lazy, scheduler="synchronous")
        return {"scene": np.asarray(computed["scene"], np.float32),
                "visual": {m: np.asarray(computed[m], np.float32) for m in mods}}


def open_cache(path: Path | str) -> TeacherCache:
    """Open and validate a teacher cache for reading."""
    return TeacherCache(path)


def describe(path: Path | str, captions: int = 3) -> dict[str, Any]:
    """Summary for `pipeline cache-info`."""
    cache = open_cache(path)
    done = cache.done
    files = [p for p in cache.path.rglob("*") if p.is_file()]
    first = [int(i) for i in np.flatnonzero(done)[:captions]]
    return {
        "path": str(cache.path), "rows": len(cache), "done": int(done.sum()),
        "done_fraction": round(float(done.mean()) if len(done) else 0.0, 4),
        "dim": cache.dim, "dtype": cache.attrs["dtype"], "modalities": cache.modalities,
        "classes": len(cache.class_names), "rows_per_shard": cache.attrs["rows_per_shard"],
        "schema_version": cache.attrs["schema_version"],
        "dataset_fingerprint": cache.dataset_fingerprint,
        "teacher_fingerprint": cache.teacher_fingerprint,
        "created": cache.attrs.get("created"), "updated": cache.attrs.get("updated"),
        "size_bytes": sum(p.stat().st_size for p in files), "files": len(files),
        "captions": {cache.ids[i]: str(cache.group["caption"][i]) for i in first},
    }
