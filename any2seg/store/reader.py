"""Reading a teacher cache: `TeacherCache` (targets by sample id, every read checked),
`open_cache`, and the `pipeline cache-info` summary.

Stage two and tools read through here; checked reads and damage come from
`any2seg.store.integrity`, the names and fingerprints from `any2seg.store.schema`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from any2seg.errors import PipelineError
from any2seg.store.integrity import CheckedShards
from any2seg.store.schema import (
    FORMAT,
    HASHES_NAME,
    SCHEMA_VERSION,
    dataset_fingerprint,
    load_zarr,
)


class TeacherCache(CheckedShards):
    """A validated store: teacher targets by sample id, with every read checked."""

    def __init__(self, path: Path | str, mode: str = "r") -> None:
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise PipelineError(f"{self.path} is not a teacher cache (no zarr.json); build it "
                                "with `pipeline cache-teacher`")
        zarr = load_zarr()
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
