"""Writing a teacher cache (stage one only): what a run asks for, how it differs from an
existing store, which rows it must compute, and `CacheWriter`, which creates and fills it.

Rows are grouped in shards of `rows_per_shard`; one shard is one file per array, written
by one writer, data first, then `input_hash`, then `done`. zarr writes files atomically
(temporary file + rename), so a run killed at any instant leaves each file either old or
new, and a rerun recomputes exactly the rows that are not `done` or whose recorded input
hash differs from their files' now (`any2seg.content`). Writers run under
`any2seg.store.lock.writer_lock`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from any2seg.errors import PipelineError
from any2seg.runlock import LOCK_NAME
from any2seg.store.integrity import Damage, StoreDamage, chunk_codecs, shard_blocks
from any2seg.store.lock import check_out_path
from any2seg.store.reader import TeacherCache
from any2seg.store.schema import (
    CHECKSUM,
    DTYPES,
    FORMAT,
    HASHES_NAME,
    INPUT_HASH,
    SCHEMA_VERSION,
    fingerprint_diff,
    is_static,
    load_zarr,
    sample_list_fingerprint,
)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class StoreSpec:
    """What a run asks of a store; compared with what an existing store holds."""

    ids: list[str]
    modalities: list[str]
    teacher_fingerprint: dict[str, Any]
    dtype: str = "float16"
    rows_per_shard: int = 64
    batch_size: int = 16
    skipped: list[str] = field(default_factory=list)

    @property
    def sample_list_fingerprint(self) -> str:
        return sample_list_fingerprint(self.ids)


@dataclass
class Dense:
    """Fitted codebooks for a new store (stage one, `--dense codebook:K`)."""

    k: int
    grid: tuple[int, int]
    codebooks: dict[str, np.ndarray]  # modality -> (K, D) float16
    reconstruction_cosine: dict[str, float]
    fit: dict[str, Any]  # seed, passes, fit / held-out sample counts, tokens seen
    view: str  # how the grid maps onto the image (stage two needs it)
    image_size: int

    def attrs(self, modalities: Sequence[str]) -> dict[str, Any]:
        return {
            "kind": "codebook", "k": self.k, "grid": list(self.grid), "view": self.view,
            "image_size": self.image_size, "fit": self.fit,
            "reconstruction_cosine": {m: round(float(self.reconstruction_cosine[m]), 6)
                                      for m in modalities},
            "codebook_sha256": {m: hashlib.sha256(np.ascontiguousarray(
                self.codebooks[m], np.float16).tobytes()).hexdigest() for m in modalities},
        }


@dataclass
class Plan:
    """Rows a run computes, by reason (disjoint)."""

    new: list[int] = field(default_factory=list)  # never computed (or not finished)
    changed: list[int] = field(default_factory=list)  # computed from files that changed since
    damaged: list[int] = field(default_factory=list)  # in damaged shards (--repair)
    static: list[str] = field(default_factory=list)  # damaged sample_id, class table, codebooks
    damages: list[Damage] = field(default_factory=list)  # what --repair found

    @property
    def rows(self) -> list[int]:
        return sorted({*self.new, *self.changed, *self.damaged})

    @property
    def empty(self) -> bool:
        return not self.rows and not self.static


def _is_ours(path: Path) -> bool | None:
    """True: our store; False: something else; None: empty or an interrupted creation."""
    entries = {p.name for p in path.iterdir()} if path.is_dir() else set()
    entries = {e for e in entries if e != LOCK_NAME and not e.startswith(HASHES_NAME)
               and not e.endswith(".partial")}
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


def mismatches(path: Path, spec: StoreSpec) -> tuple[TeacherCache | None, list[str]]:
    """The existing store (None when a new one must be created) and how it differs from
    `spec`. A foreign folder is refused: it is never written into or replaced."""
    check_out_path(path)
    ours = _is_ours(path) if path.exists() else None
    if ours is False:
        raise PipelineError(f"{path} exists and is not a teacher cache; refusing to write "
                            "into it: choose another --out or remove it yourself")
    if ours is None:
        return None, []
    attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    if attrs.get("schema_version") != SCHEMA_VERSION:
        return None, [f"schema version {attrs.get('schema_version')} (this version writes "
                      f"{SCHEMA_VERSION}, with per-chunk checksums and per-row input hashes)"]
    cache = TeacherCache(path)
    problems = []
    if cache.sample_list_fingerprint != spec.sample_list_fingerprint:
        problems.append(f"another sample list ({cache.n} samples, fingerprint "
                        f"{cache.sample_list_fingerprint} in the store; "
                        f"{len(spec.ids)} samples, {spec.sample_list_fingerprint} now)")
    teacher = fingerprint_diff(cache.teacher_fingerprint, spec.teacher_fingerprint)
    if teacher:
        problems.append("another teacher: " + "; ".join(teacher[:4]))
    if cache.attrs["dtype"] != spec.dtype:
        problems.append(f"dtype {cache.attrs['dtype']} (requested {spec.dtype})")
    if sorted(cache.modalities) != sorted(spec.modalities):
        problems.append(f"modalities {cache.modalities} (requested {spec.modalities})")
    return cache, problems


def plan(cache: TeacherCache, input_hashes: list[str | None], repair: bool,
         show: bool = False,
         complete: Callable[[list[int]], None] | None = None) -> Plan:
    """What a run must compute in an existing store whose rows match the request.

    An input hash may be None (a file's digest is not known yet): `complete(rows)` fills
    those of the done rows it must compare (reading their files); the others, computed
    anyway, take theirs from the read that decodes them."""
    done, damages = cache.scan(show)
    if damages and not repair:
        raise StoreDamage(cache.path, damages, cache.repair_command())
    result = Plan(damages=damages)
    static = {d.array for d in damages if is_static(d.array)}
    result.static = sorted(static)
    bad = {r for d in damages if d.array not in static for r in d.rows}
    ok_shards = [s for s in range(cache.num_shards)
                 if not bad.intersection(cache.shard_rows(s)) and
                 done[cache.shard_rows(s).start:cache.shard_rows(s).stop].any()]
    unknown = [r for r in range(cache.n)
               if done[r] and r not in bad and input_hashes[r] is None]
    if unknown:
        if complete is None:
            raise ValueError("plan needs the input hashes of the done rows")
        complete(unknown)
    stored = np.zeros(cache.n, dtype=cache.group["input_hash"].dtype)
    for block in shard_blocks(ok_shards):
        cache._read_shards("input_hash", block, lambda _s: False, [], stored)
    for r in range(cache.n):
        if r in bad:
            result.damaged.append(r)
        elif not done[r]:
            result.new.append(r)
        elif stored[r] != input_hashes[r]:
            result.changed.append(r)
    return result


def _write_static(group: Any, spec: StoreSpec, class_names: Sequence[str], classes: np.ndarray,
                  names: Sequence[str]) -> None:
    with load_zarr().config.set({"array.write_empty_chunks": True}):
        if "sample_id" in names:
            group["sample_id"][:] = np.asarray(spec.ids, dtype=object).astype(str)
        if "class_names" in names and len(class_names):
            group["class_names"][:] = np.asarray(list(class_names), dtype=str)
        if "classes" in names and len(class_names):
            group["classes"][:] = classes.astype(group.attrs["dtype"])


class CacheWriter(TeacherCache):
    """Creates and fills a store. Used by stage one only, under `writer_lock`."""

    def __init__(self, path: Path) -> None:
        # arrays keep the config they are opened with: every chunk is written, even one
        # holding only fill values (empty captions), so a missing file always means damage
        with load_zarr().config.set({"array.write_empty_chunks": True}):
            super().__init__(path, mode="r+")
        self.batch_size = int(self.attrs.get("batch_size", 16))

    @classmethod
    def create(cls, path: Path, spec: StoreSpec, dim: int, class_names: Sequence[str],
               classes: np.ndarray, extra_attrs: dict[str, Any] | None = None,
               dense: Dense | None = None) -> CacheWriter:
        """A new store with ids, classes, codebooks (with `dense`) and empty rows
        (replacing an old one of ours)."""
        if spec.dtype not in DTYPES:
            raise PipelineError(f"dtype must be one of {', '.join(DTYPES)}, got {spec.dtype}")
        zarr = load_zarr()
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.iterdir():  # only reached for empty, interrupted or our stores
            if entry.name == LOCK_NAME or entry.name == HASHES_NAME:
                continue
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        n, k, r = len(spec.ids), len(class_names), spec.rows_per_shard
        attrs = {
            "format": FORMAT, "schema_version": SCHEMA_VERSION, "state": "creating",
            "teacher_fingerprint": spec.teacher_fingerprint,
            "sample_list_fingerprint": spec.sample_list_fingerprint, "dim": int(dim),
            "dtype": spec.dtype, "modalities": list(spec.modalities), "rows_per_shard": r,
            "batch_size": spec.batch_size, "skipped": list(spec.skipped),
            "checksum": CHECKSUM, "input_hash": INPUT_HASH,
            "created": _now(), "updated": _now(), **(extra_attrs or {}),
        }
        group = zarr.create_group(str(path), attributes=attrs)
        rows = (max(1, min(r, n)),)
        kw = {"compressors": chunk_codecs()}
        group.create_array("sample_id", shape=(n,), dtype=str, chunks=rows, shards=rows, **kw)
        group.create_array("caption", shape=(n,), dtype=str, chunks=rows, shards=rows, **kw)
        group.create_array("input_hash", shape=(n,), dtype=str, chunks=rows, shards=rows, **kw)
        group.create_array("done", shape=(n,), dtype=bool, chunks=rows, shards=rows,
                           fill_value=False, **kw)
        vec = (rows[0], int(dim))
        group.create_array("scene", shape=(n, dim), dtype=spec.dtype, chunks=vec, shards=vec,
                           fill_value=0, **kw)
        for m in spec.modalities:
            group.create_array(f"visual/{m}", shape=(n, dim), dtype=spec.dtype, chunks=vec,
                               shards=vec, fill_value=0, **kw)
        kk = (max(k, 1),)
        group.create_array("classes", shape=(k, dim), dtype=spec.dtype,
                           chunks=(kk[0], int(dim)), shards=(kk[0], int(dim)), fill_value=0,
                           **kw)
        group.create_array("class_names", shape=(k,), dtype=str, chunks=kk, shards=kk, **kw)
        if dense is not None:
            g = (rows[0], *dense.grid)
            for m in spec.modalities:
                book = np.asarray(dense.codebooks[m], np.float16)
                arr = group.create_array(f"codebook/{m}", shape=book.shape, dtype="float16",
                                         chunks=book.shape, shards=book.shape, fill_value=0,
                                         **kw)
                with zarr.config.set({"array.write_empty_chunks": True}):
                    arr[:] = book
                group.create_array(f"codes/{m}", shape=(n, *dense.grid), dtype="uint16",
                                   chunks=g, shards=g, fill_value=0, **kw)
            group.attrs["dense"] = dense.attrs(spec.modalities)
        _write_static(group, spec, class_names, classes, ("sample_id", "class_names", "classes"))
        group.attrs["state"] = "ready"
        return cls(path)

    def write_static(self, spec: StoreSpec, class_names: Sequence[str], classes: np.ndarray,
                     names: Sequence[str]) -> None:
        """Rewrite damaged arrays fixed at creation (sample ids, class names, E_C)."""
        _write_static(self.group, spec, class_names, classes, names)

    # -- rows ---------------------------------------------------------------------------
    def write_rows(self, rows: Sequence[int], captions: Sequence[str], scene: np.ndarray,
                   visual: dict[str, np.ndarray], input_hashes: Sequence[str],
                   codes: dict[str, np.ndarray] | None = None) -> None:
        """Write rows of one shard: data first, then their input hashes, then `done`.

        A whole shard is written as a slice; a subset (rows whose inputs changed) through
        an orthogonal selection, which rewrites the shard file atomically."""
        rows = [int(r) for r in rows]
        n = len(rows)
        if (len(captions) != n or scene.shape[0] != n or len(input_hashes) != n
                or set(visual) != set(self.modalities)):
            raise ValueError(f"rows {rows[:3]}... need {n} entries of {self.modalities}")
        if (codes is not None) != (self.dense is not None) or (
                codes is not None and set(codes) != set(self.modalities)):
            raise ValueError(f"rows {rows[:3]}...: codes of {self.modalities} are needed "
                             "exactly when the store holds dense codes")
        whole = rows == list(range(rows[0], rows[-1] + 1))
        sel: Any = slice(rows[0], rows[-1] + 1) if whole else np.asarray(rows)
        dtype = self.attrs["dtype"]

        def put(name: str, values: np.ndarray) -> None:
            if whole:
                self.arrays[name][sel] = values
            else:
                self.arrays[name].oindex[sel] = values

        put("caption", np.asarray(list(captions), dtype=str))
        put("scene", scene.astype(dtype))
        for m in self.modalities:
            put(f"visual/{m}", visual[m].astype(dtype))
            if codes is not None:
                put(f"codes/{m}", np.asarray(codes[m], np.uint16))
        put("input_hash", np.asarray(list(input_hashes), dtype=str))
        put("done", np.ones(n, dtype=bool))

    def discard(self, damages: Sequence[Damage]) -> None:
        """Delete damaged shard files before their rows are rewritten: zarr reads a shard
        it writes into, and a damaged one cannot be read. A kill right after leaves the
        rows missing, which the next `--repair` finds again."""
        for d in damages:
            self.shard_file(d.array, d.shard).unlink(missing_ok=True)

    def touch(self) -> None:
        self.group.attrs["updated"] = _now()

    def remove_partials(self) -> None:
        """Temporary files of writes interrupted by a kill (the targets are intact)."""
        for p in self.path.rglob("*.partial"):
            p.unlink(missing_ok=True)
