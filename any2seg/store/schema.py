"""The store's public schema: array and attribute names, format constants, fingerprints.

Everything another tool needs to read a teacher cache without this package (schema 2):

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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

FORMAT = "any2seg-teacher-cache"
SCHEMA_VERSION = 2
HASHES_NAME = ".input-hashes.json"  # remembered file digests (any2seg.content)
DTYPES = ("float16", "float32")
CHECKSUM = "crc32c per chunk (zarr crc32c codec inside each shard)"
INPUT_HASH = ("sha256 over '<kind>\\t<sha256 of the file bytes>\\n' for the sample's files "
              "in sorted kind order, hex[:32]")


def is_static(name: str) -> bool:
    """Arrays written once at creation, not per row (class table, codebooks)."""
    return name in ("sample_id", "classes", "class_names") or name.startswith("codebook/")


def per_class_table(name: str) -> bool:
    """Arrays with one row per class or codeword (the class table, codebooks), not per sample."""
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


def load_zarr() -> Any:
    """The zarr module, with the warnings its string arrays print on every open silenced."""
    import warnings

    import zarr

    warnings.filterwarnings("ignore", message=".*vlen-utf8.*")
    warnings.filterwarnings("ignore", message=".*StringDType.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="zarr")
    return zarr


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
