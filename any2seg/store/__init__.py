"""The teacher cache: one zarr v3 group per dataset/teacher pairing (schema 2).

The package re-exports its public names, so `from any2seg.store import open_cache` (and
every other name below) works as it did when the store was one module. Where things live:
  schema     array and attribute names, format constants, fingerprints
  integrity  per-chunk CRC32C, damage found in checked reads, the whole-store scan
  reader     TeacherCache (targets by sample id), open_cache, describe (cache-info)
  writer     StoreSpec, mismatches, plan (what a run computes), CacheWriter (stage one only)
  lock       the writer lock: one stage-one run per store
"""

from any2seg.store.integrity import Damage, StoreDamage, damaged_rows
from any2seg.store.lock import check_out_path, writer_lock
from any2seg.store.reader import TeacherCache, dense_summary, describe, open_cache
from any2seg.store.schema import (
    CHECKSUM,
    DTYPES,
    FORMAT,
    HASHES_NAME,
    INPUT_HASH,
    SCHEMA_VERSION,
    dataset_fingerprint,
    fingerprint_diff,
    is_static,
    sample_list_fingerprint,
)
from any2seg.store.writer import CacheWriter, Dense, Plan, StoreSpec, mismatches, plan

__all__ = [
    "CHECKSUM", "DTYPES", "FORMAT", "HASHES_NAME", "INPUT_HASH", "SCHEMA_VERSION",
    "CacheWriter", "Damage", "Dense", "Plan", "StoreDamage", "StoreSpec", "TeacherCache",
    "check_out_path", "damaged_rows", "dataset_fingerprint", "dense_summary", "describe",
    "fingerprint_diff", "is_static", "mismatches", "open_cache", "plan",
    "sample_list_fingerprint", "writer_lock",
]
