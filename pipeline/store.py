"""The teacher cache: one zarr v3 group per dataset/teacher pairing (schema 2).

Arrays (names are the public schema; other tools read them):
  sample_id (N,) str      caption (N,) str      done (N,) bool      input_hash (N,) str
  scene (N, D)            visual/<modality> (N, D)
  classes (K, D)          class_names (K,) str
With dense codes (`cache-teacher --dense codebook:K`, CodeAlign), also
  codebook/<modality> (K, D) float16      codes/<modality> (N, h, w) uint16
and the attribute `dense` (K, grid, the teacher view, fit settings, each codebook's
sha256, held-out reconstruction cosine). A store without them is unchanged.
Attributes: schema_version, teacher_fingerprint, sample_list_fingerprint, dim, dtype,
plus format, modalities, rows_per_shard, batch_size, skipped, checksum, input_hash,
dataset, splits, root, teacher_root, state, created, updated.

Rows are grouped in shards of `rows_per_shard`; one shard is one file per array, written
by one writer, data first, then `input_hash`, then `done`. zarr writes files atomically
(temporary file + rename), so a run killed at any instant leaves each file either old or
new, and a rerun recomputes exactly the rows that are not `done` or whose recorded input
hash differs from their files' now (`pipeline.content`). Writers hold an exclusive
`flock` on `<store>/.lock` for the whole run; a complete store is never locked.

Every chunk carries a CRC32C (zarr's `crc32c` codec inside the shard, after zstd), so a
flipped or truncated byte fails to decode; a missing or empty shard file, which zarr
would read as fill values (zeros), counts as damage wherever a `done` row needs it.
Readers turn damage into one `StoreDamage` line naming the arrays, rows and the repair
command; `TeacherCache.verify` checks a whole store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.runlock import LOCK_NAME, folder_lock

FORMAT = "any2seg-teacher-cache"
SCHEMA_VERSION = 2
HASHES_NAME = ".input-hashes.json"  # remembered file digests (pipeline.content)
DTYPES = ("float16", "float32")
CHECKSUM = "crc32c per chunk (zarr crc32c codec inside each shard)"
INPUT_HASH = ("sha256 over '<kind>\\t<sha256 of the file bytes>\\n' for the sample's files "
              "in sorted kind order, hex[:32]")
_SCAN_BLOCK = 16  # shards read per step when scanning (a failing block is read shard by shard)


def is_static(name: str) -> bool:
    """Arrays written once at creation, not per row (class table, codebooks)."""
    return name in ("sample_id", "classes", "class_names") or name.startswith("codebook/")


def _per_class_table(name: str) -> bool:
    return name in ("classes", "class_names") or name.startswith("codebook/")


def sample_list_fingerprint(ids: Sequence[str]) -> str:
    """Hash of the ordered sample ids: which rows a store has, wherever the data lives."""
    h = hashlib.sha256()
    for sample_id in ids:
        h.update(sample_id.encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def dataset_fingerprint(ids: Sequence[str], input_hashes: Sequence[str]) -> str:
    """Hash of the ordered (sample id, input hash) pairs: what the rows were computed from."""
    h = hashlib.sha256()
    for sample_id, digest in zip(ids, input_hashes, strict=True):
        h.update(f"{sample_id}\t{digest}\n".encode())
    return h.hexdigest()[:16]


def _zarr():
    import warnings

    import zarr

    warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
    warnings.filterwarnings("ignore", message=".*StringDType.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    return zarr


def _codecs() -> list[Any]:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(), Crc32cCodec()]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def fingerprint_diff(stored: Any, requested: Any, prefix: str = "") -> list[str]:
    """Human-readable list of the leaves where two nested dicts differ."""
    if isinstance(stored, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(stored) | set(requested)):
            out += fingerprint_diff(stored.get(key), requested.get(key), f"{prefix}{key}.")
        return out
    if stored != requested:
        def show(v: Any) -> str:
            return "absent" if v is None else "set" if isinstance(v, dict) else json.dumps(v)

        return [f"{prefix[:-1]} ({show(stored)} in the store, {show(requested)} now)"]
    return []


def check_out_path(path: Path) -> None:
    """Refuse a --out that cannot be a store folder before anything is created."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "--out" if p == path else f"--out's parent {p}"
                raise PipelineError(f"{what} is a file, not a folder: the teacher cache is a "
                                    f"store folder; choose another --out (e.g. "
                                    f"cache/<dataset>.zarr)")
            return


@contextmanager
def writer_lock(path: Path) -> Iterator[None]:
    """Exclusive lock on the store for one run; released by the kernel even on SIGKILL."""
    check_out_path(path)
    with folder_lock(path, "wait for it to finish (two writers on one store are refused)"):
        yield


# ---------------------------------------------------------------------------------------
# damage
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Damage:
    """One array's shard that cannot be trusted, and the rows it holds."""

    array: str
    rows: range
    problem: str
    shard: int = 0

    @property
    def sample_rows(self) -> bool:
        """Whether `rows` are sample rows (False for the class table)."""
        return not _per_class_table(self.array)

    def where(self) -> str:
        if not self.sample_rows:
            what = "codes" if self.array.startswith("codebook/") else "classes"
            return f"{self.array}, all {len(self.rows)} {what} ({self.problem})"
        span = (f"row {self.rows.start}" if len(self.rows) == 1 else
                f"rows {self.rows.start}-{self.rows.stop - 1}")
        return f"{self.array} {span} ({self.problem})"


class StoreDamage(PipelineError):
    """A store whose chunks fail their checksums or are missing for computed rows."""

    def __init__(self, path: Path, damages: Sequence[Damage], repair: str) -> None:
        self.path, self.damages, self.repair = path, list(damages), repair
        shown = "; ".join(d.where() for d in self.damages[:3])
        more = f"; and {len(self.damages) - 3} more" if len(self.damages) > 3 else ""
        super().__init__(f"{path} is damaged: {shown}{more}; recompute the damaged rows with "
                         f"`{repair}` (`pipeline cache-verify {path}` lists them)")


def damaged_rows(damages: Sequence[Damage]) -> list[int]:
    """Sample rows held by damaged chunks."""
    return sorted({r for d in damages if d.sample_rows for r in d.rows})


def _blocks(shards: Sequence[int]) -> list[list[int]]:
    """Sorted shard numbers cut into contiguous runs of at most `_SCAN_BLOCK`."""
    out: list[list[int]] = []
    for s in sorted(shards):
        if out and out[-1][-1] == s - 1 and len(out[-1]) < _SCAN_BLOCK:
            out[-1].append(s)
        else:
            out.append([s])
    return out


# ---------------------------------------------------------------------------------------
# reading (stage two and tools)
# ---------------------------------------------------------------------------------------
class TeacherCache:
    """A validated store: teacher targets by sample id, with every read checked."""

    def __init__(self, path: Path | str, mode: str = "r") -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise PipelineError(f"{self.path} is not a teacher cache (no zarr.json); build it "
                                "with `pipeline cache-teacher`")
        zarr = _zarr()
        try:
            self.group = zarr.open_group(str(self.path), mode=mode)
        except Exception as exc:  # noqa: BLE001
            raise PipelineError(f"cannot open {self.path} as a zarr store ({exc})") from exc
        self.attrs = dict(self.group.attrs)
        self._validate()
        self.n = int(self.group["sample_id"].shape[0])
        self.rows_per_shard = int(self.attrs["rows_per_shard"])

    def _validate(self) -> None:
        a = self.attrs
        if a.get("format") != FORMAT:
            raise PipelineError(f"{self.path} is not a teacher cache (format {a.get('format')!r})")
        if a.get("schema_version") != SCHEMA_VERSION:
            raise PipelineError(
                f"{self.path} has cache schema {a.get('schema_version')}; this version reads "
                f"{SCHEMA_VERSION} (per-chunk checksums and per-row input hashes, which older "
                "stores lack, so their rows cannot be verified): rebuild it with "
                "`pipeline cache-teacher --overwrite`")
        if a.get("state") != "ready":
            raise PipelineError(f"{self.path} was not fully created; rerun "
                                "`pipeline cache-teacher`")
        self.arrays: dict[str, Any] = {}
        for name in self.array_names:
            try:
                self.arrays[name] = self.group[name]  # opened once: zarr reads metadata
            except KeyError:
                raise PipelineError(f"{self.path} lacks the array {name}; the store is "
                                    "damaged: rebuild it with `pipeline cache-teacher "
                                    "--overwrite`") from None
        n, d = self.arrays["sample_id"].shape[0], int(a["dim"])
        for name in self.row_arrays:
            if self.arrays[name].shape[0] != n:
                raise PipelineError(f"{self.path}: {name} has {self.arrays[name].shape[0]} rows, "
                                    f"expected {n}")
        for name in ("scene", *(f"visual/{m}" for m in a["modalities"])):
            if self.arrays[name].shape != (n, d):
                raise PipelineError(f"{self.path}: {name} has shape {self.arrays[name].shape}, "
                                    f"expected {(n, d)}")
        if self.arrays["classes"].shape[1] != d:
            raise PipelineError(f"{self.path}: classes has dim {self.arrays['classes'].shape[1]}, "
                                f"expected {d}")
        if self.dense is not None:
            k, g = int(self.dense["k"]), list(self.dense["grid"])
            for m in self.modalities:
                want = {f"codebook/{m}": (k, d), f"codes/{m}": (n, *g)}
                for name, shape in want.items():
                    if tuple(self.arrays[name].shape) != shape:
                        raise PipelineError(f"{self.path}: {name} has shape "
                                            f"{self.arrays[name].shape}, expected {shape}")

    # -- metadata -----------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return list(self.attrs["modalities"])

    @property
    def dense(self) -> dict[str, Any] | None:
        """The `dense` attribute of a store with codebook codes, else None."""
        return self.attrs.get("dense")

    @property
    def row_arrays(self) -> list[str]:
        """Arrays with one entry per row, written by the run (not at creation)."""
        codes = [f"codes/{m}" for m in self.modalities] if self.dense is not None else []
        return ["caption", "scene", *(f"visual/{m}" for m in self.modalities), *codes,
                "input_hash"]

    @property
    def codebook_arrays(self) -> list[str]:
        return [f"codebook/{m}" for m in self.modalities] if self.dense is not None else []

    @property
    def array_names(self) -> list[str]:
        return ["sample_id", "class_names", "classes", *self.codebook_arrays, "done",
                *self.row_arrays]

    @property
    def codebook_fingerprint(self) -> str | None:
        """Hash of every modality's stored codebook (None without dense codes): stage two
        records it, so a refitted codebook is never mixed into a resumed run."""
        if self.dense is None:
            return None
        h = hashlib.sha256()
        for m, digest in sorted(self.dense["codebook_sha256"].items()):
            h.update(f"{m}\t{digest}\n".encode())
        return h.hexdigest()[:16]

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def teacher_fingerprint(self) -> dict[str, Any]:
        return dict(self.attrs["teacher_fingerprint"])

    @property
    def sample_list_fingerprint(self) -> str:
        return str(self.attrs["sample_list_fingerprint"])

    @property
    def skipped(self) -> list[str]:
        """Samples the build dropped as broken (`--skip-bad`); they have no rows."""
        return list(self.attrs.get("skipped") or [])

    @cached_property
    def dataset_fingerprint(self) -> str:
        """Hash of every row's sample id and input hash (changes when any row's inputs do)."""
        return dataset_fingerprint(self.ids, self.read("input_hash").tolist())

    def repair_command(self) -> str:
        a = self.attrs
        parts = ["pipeline cache-teacher"]
        if a.get("dataset"):
            parts.append(f"--dataset {a['dataset']}")
        if a.get("root"):
            parts.append(f"--root {a['root']}")
        if a.get("splits") and list(a["splits"]) != ["train", "val", "test"]:
            parts.append(f"--split {','.join(a['splits'])}")
        if a.get("teacher_root"):
            parts.append(f"--teacher-root {a['teacher_root']}")
        parts += [f"--out {self.path}", "--repair"]
        return " ".join(parts)

    def __len__(self) -> int:
        return self.n

    # -- shards and checked reads -----------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return -(-self.n // self.rows_per_shard)

    def shard_rows(self, shard: int) -> range:
        start = shard * self.rows_per_shard
        return range(start, min(start + self.rows_per_shard, self.n))

    def shard_file(self, name: str, shard: int) -> Path:
        """The file holding shard `shard` of array `name`."""
        arr = self.arrays[name]
        coords = (shard,) + (0,) * (arr.ndim - 1)
        return self.path / name / arr.metadata.encode_chunk_key(coords)

    def _file_problem(self, name: str, shard: int) -> str | None:
        f = self.shard_file(name, shard)
        try:
            size = f.stat().st_size
        except FileNotFoundError:
            return f"missing file {f.relative_to(self.path)}"
        return f"empty file {f.relative_to(self.path)}" if size == 0 else None

    def _read_shards(self, name: str, shards: Sequence[int], need: Callable[[int], bool],
                     damages: list[Damage], out: np.ndarray | None = None) -> np.ndarray:
        """Rows of `shards` (a contiguous run) of array `name`, into `out` (whole-array
        shaped) or a new block. A shard that fails its checksum, or whose file is absent or
        empty where `need(shard)`, is added to `damages` (and left as zeros)."""
        arr = self.arrays[name]
        rows_of = self._rows_of(name)
        start, stop = rows_of(shards[0]).start, rows_of(shards[-1]).stop
        offset = 0
        if out is None:
            out = np.zeros((stop - start, *arr.shape[1:]), dtype=arr.dtype)
            offset = start
        bad = set()
        for s in shards:
            problem = self._file_problem(name, s) if need(s) else None
            if problem:
                damages.append(Damage(name, rows_of(s), problem, s))
                bad.add(s)
        if not bad:
            try:
                out[start - offset:stop - offset] = arr[start:stop]
                return out
            except Exception:  # noqa: BLE001  (zarr raises ValueError for a bad checksum)
                pass
        for s in shards:  # one shard at a time to find the broken ones
            if s in bad:
                continue
            rows = rows_of(s)
            try:
                out[rows.start - offset:rows.stop - offset] = arr[rows.start:rows.stop]
            except Exception as exc:  # noqa: BLE001
                problem = ("checksum mismatch" if "checksum" in str(exc).lower()
                           else f"unreadable: {type(exc).__name__}")
                damages.append(Damage(name, rows_of(s), problem, s))
        return out

    def _rows_of(self, name: str) -> Callable[[int], range]:
        if _per_class_table(name):
            k = int(self.arrays[name].shape[0])
            return lambda s: range(0, k)
        return self.shard_rows

    def _shards_of(self, name: str) -> list[int]:
        if _per_class_table(name):
            return [0] if self.arrays[name].shape[0] else []
        return list(range(self.num_shards))

    def _done_shards(self, shards: Sequence[int], damages: list[Damage]) -> set[int]:
        """Those of `shards` holding a done row, or whose `done` chunk is unreadable."""
        done = np.zeros(self.n, dtype=bool)
        for block in _blocks(shards):
            found: list[Damage] = []
            self._read_shards("done", block, lambda _s: False, found, done)
            for d in found:
                done[d.rows.start:d.rows.stop] = True
            damages += found
        return {s for s in shards
                if done[self.shard_rows(s).start:self.shard_rows(s).stop].any()}

    def read(self, name: str, rows: Sequence[int] | None = None) -> np.ndarray:
        """Checked read of array `name` (whole, or the shards holding `rows`, the rest left
        empty); damage in what is read raises one `StoreDamage` line."""
        return self._read_checked([name], rows)[name]

    def _read_checked(self, names: Sequence[str],
                      rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        damages: list[Damage] = []
        all_shards = list(range(self.num_shards))
        shards = all_shards if rows is None else \
            sorted({int(r) // self.rows_per_shard for r in rows})
        needed: set[int] | None = None
        out = {}
        for name in names:
            arr = self.arrays[name]
            out[name] = np.zeros(arr.shape, dtype=arr.dtype)
            if _per_class_table(name):
                need: Callable[[int], bool] = lambda _s: True  # noqa: E731
                name_shards = self._shards_of(name)
            elif name in ("sample_id", "done"):
                need = lambda _s, _n=name: _n != "done"  # noqa: E731  (absent: not done)
                name_shards = shards
            else:
                if needed is None:  # shards holding a done row need every row array
                    needed = self._done_shards(shards, damages)
                need, name_shards = needed.__contains__, shards
            for block in _blocks(name_shards):
                self._read_shards(name, block, need, damages, out[name])
        if damages:
            raise StoreDamage(self.path, damages, self.repair_command())
        return out

    @cached_property
    def ids(self) -> list[str]:
        return [str(s) for s in self.read("sample_id")]

    @cached_property
    def _row(self) -> dict[str, int]:
        return {sample_id: i for i, sample_id in enumerate(self.ids)}

    @cached_property
    def class_names(self) -> list[str]:
        return [str(s) for s in self.read("class_names")]

    @property
    def done(self) -> np.ndarray:
        return np.asarray(self.read("done"), dtype=bool)

    @property
    def classes(self) -> np.ndarray:
        """E_C, (K, D) float32 (small; read eagerly)."""
        return np.asarray(self.read("classes"), dtype=np.float32)

    def captions(self, sample_ids: Sequence[str] | None = None) -> list[str]:
        rows = self.rows(sample_ids) if sample_ids is not None else np.arange(self.n)
        return [str(c) for c in self.read("caption", rows)[rows]]

    # -- whole-store check ------------------------------------------------------------------
    def scan(self, show: bool = False) -> tuple[np.ndarray, list[Damage]]:
        """Read every chunk once: the `done` flags (False where unreadable) and every damage.

        Reads blocks of shards (one block at a time when all is well) so a complete
        DELIVER-size store scans in about a second."""
        from pipeline.progress import progress

        damages: list[Damage] = []
        n_shards = self.num_shards
        blocks = _blocks(range(n_shards))
        static = [(name, _blocks(self._shards_of(name)))
                  for name in ("sample_id", "class_names", "classes", *self.codebook_arrays)]
        total = sum(len(bl) for _, bl in static) + len(blocks) * (1 + len(self.row_arrays))
        bar = progress(total=total, desc=f"verifying {self.path.name}", unit="block",
                       enabled=show)
        try:
            for name, name_blocks in static:
                for block in name_blocks:
                    self._read_shards(name, block, lambda _s: True, damages)
                    bar.update(1)
            done = np.zeros(self.n, dtype=bool)
            done_broken: set[int] = set()
            for block in blocks:
                found: list[Damage] = []
                self._read_shards("done", block, lambda _s: False, found, done)
                for d in found:
                    done[d.rows.start:d.rows.stop] = False
                    done_broken.update(d.rows)
                damages += found
                bar.update(1)

            def needed(s: int) -> bool:
                rows = self.shard_rows(s)
                return bool(done[rows.start:rows.stop].any()) or rows.start in done_broken

            for name in self.row_arrays:
                for block in blocks:
                    self._read_shards(name, block, needed, damages)
                    bar.update(1)
        finally:
            bar.close()
        return done, damages

    def verify(self, show: bool = False) -> list[Damage]:
        """Every damaged (array, shard) of the store; empty when it is intact."""
        return self.scan(show)[1]

    def check(self) -> None:
        """Raise one `StoreDamage` line when any chunk is damaged."""
        damages = self.verify()
        if damages:
            raise StoreDamage(self.path, damages, self.repair_command())

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
        """{"scene": (n, D), "visual": {m: (n, D)}} as float32 numpy for these samples,
        read with every chunk checked (damage raises one `StoreDamage` line)."""
        rows = self.rows(sample_ids)
        mods = list(modalities) if modalities is not None else self.modalities
        for m in mods:
            if m not in self.modalities:
                raise PipelineError(f"{self.path} has no modality {m!r}; it holds "
                                    f"{', '.join(self.modalities)}")
        got = self._read_checked(["scene", *(f"visual/{m}" for m in mods)], rows)
        every = rows.size == self.n and bool((rows == np.arange(self.n)).all())
        vec = {name: np.asarray(values if every else values[rows], np.float32)
               for name, values in got.items()}
        return {"scene": vec["scene"], "visual": {m: vec[f"visual/{m}"] for m in mods}}

    def codebook(self, modality: str) -> np.ndarray:
        """Modality's codebook, (K, D) float16 as stored (checked read)."""
        self._need_dense(modality)
        return self.read(f"codebook/{modality}")

    def codes(self, sample_ids: Sequence[str], modalities: Sequence[str]) -> np.ndarray:
        """(n, M, h, w) uint16 teacher codes for these samples (checked read)."""
        for m in modalities:
            self._need_dense(m)
        rows = self.rows(sample_ids)
        got = self._read_checked([f"codes/{m}" for m in modalities], rows)
        return np.stack([got[f"codes/{m}"][rows] for m in modalities], axis=1)

    def _need_dense(self, modality: str) -> None:
        if self.dense is None:
            raise PipelineError(f"{self.path} holds no dense codes; build it with "
                                "`pipeline cache-teacher --dense codebook:K` (or set "
                                "teacher.dense), or set train.loss.w_teacher_code and "
                                "w_teacher_decoded to 0")
        if modality not in self.modalities:
            raise PipelineError(f"{self.path} has no modality {modality!r}; it holds "
                                f"{', '.join(self.modalities)}")

    # -- lazy arrays (unchecked: for tools that stream large stores themselves) ----------------
    def _dask(self, name: str) -> Any:
        import dask.array as da

        return da.from_zarr(self.arrays[name])

    @property
    def scene(self) -> Any:
        """E_S for every row, (N, D) dask array (chunks are checksummed by zarr on read)."""
        return self._dask("scene")

    def visual(self, modality: str) -> Any:
        """E_m for every row, (N, D) dask array."""
        if modality not in self.modalities:
            raise PipelineError(f"{self.path} has no modality {modality!r}; it holds "
                                f"{', '.join(self.modalities)}")
        return self._dask(f"visual/{modality}")


def open_cache(path: Path | str) -> TeacherCache:
    """Open and validate a teacher cache for reading."""
    return TeacherCache(path)


def describe(path: Path | str, captions: int = 3) -> dict[str, Any]:
    """Summary for `pipeline cache-info` (after checking every chunk)."""
    cache = open_cache(path)
    cache.check()
    done = cache.done
    files = [p for p in cache.path.rglob("*") if p.is_file() and p.name != HASHES_NAME]
    first = [int(i) for i in np.flatnonzero(done)[:captions]]
    texts = cache.captions([cache.ids[i] for i in first]) if first else []
    return {
        "path": str(cache.path), "rows": len(cache), "done": int(done.sum()),
        "done_fraction": round(float(done.mean()) if len(done) else 0.0, 4),
        "dim": cache.dim, "dtype": cache.attrs["dtype"], "modalities": cache.modalities,
        "classes": len(cache.class_names), "rows_per_shard": cache.attrs["rows_per_shard"],
        "schema_version": cache.attrs["schema_version"],
        "skipped": len(cache.skipped),
        "sample_list_fingerprint": cache.sample_list_fingerprint,
        "dataset_fingerprint": cache.dataset_fingerprint,
        "teacher_fingerprint": cache.teacher_fingerprint,
        "created": cache.attrs.get("created"), "updated": cache.attrs.get("updated"),
        "last_run": cache.attrs.get("last_run"),  # throughput of the last build or update
        "size_bytes": sum(p.stat().st_size for p in files), "files": len(files),
        "captions": {cache.ids[i]: t for i, t in zip(first, texts, strict=True)},
        **({"dense": dense_summary(cache)} if cache.dense is not None else {}),
    }


def dense_summary(cache: TeacherCache) -> dict[str, Any]:
    """Bytes per sample of the codes (raw uint16 and on disk) against what fp16 dense
    tokens would take, and the held-out reconstruction cosine recorded by the fit."""
    d = cache.dense
    assert d is not None
    h, w = d["grid"]
    mods = cache.modalities
    raw_codes = h * w * 2 * len(mods)
    fp16 = h * w * cache.dim * 2 * len(mods)
    on_disk = sum(p.stat().st_size for m in mods
                  for p in (cache.path / "codes" / m).rglob("*") if p.is_file())
    books = sum(p.stat().st_size for m in mods
                for p in (cache.path / "codebook" / m).rglob("*") if p.is_file())
    n = max(1, cache.n)
    return {
        "k": d["k"], "grid": [h, w], "modalities": mods,
        "bytes_per_sample": {"codes_uint16": raw_codes, "codes_on_disk": round(on_disk / n, 1),
                             "fp16_tokens": fp16},
        "ratio_raw": round(fp16 / raw_codes, 1),
        "ratio_on_disk": round(fp16 / max(on_disk / n, 1e-9), 1),
        "codebook_bytes": books, "codebook_fingerprint": cache.codebook_fingerprint,
        "reconstruction_cosine": d["reconstruction_cosine"],
        "heldout_samples": d["fit"]["heldout_samples"],
    }


# ---------------------------------------------------------------------------------------
# writing (stage one only)
# ---------------------------------------------------------------------------------------
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
    for block in _blocks(ok_shards):
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
    with _zarr().config.set({"array.write_empty_chunks": True}):
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
        with _zarr().config.set({"array.write_empty_chunks": True}):
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
        zarr = _zarr()
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
        kw = {"compressors": _codecs()}
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
