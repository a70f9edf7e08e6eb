"""What the per-chunk CRC32C and the checked reads cost the teacher cache.

    python benchmarks/cache_checksum.py [--rows 4000] [--dim 768] [--repeats 9] [--out FILE]

Builds a DELIVER-size store (4 modalities, float16, 64 rows per shard) twice: with the
schema-2 codecs (zstd, then crc32c inside each shard) and with zstd alone (schema 1's
codecs), and times, per variant and repeat:
- write: every shard written through `CacheWriter.write_rows`;
- read: every vector of every row with a plain zarr read (the codec's cost alone), and as
  stage two reads it (`TeacherCache.get`, which also reads `done` and checks that each
  needed shard file exists and is not empty), both against a plain zarr read of the
  zstd-only store (schema 1's reader);
- verify: `TeacherCache.verify` (every chunk of every array, as `cache-teacher` does on
  each rerun and `cache-verify` does).
Times are CPU seconds of this process (all its threads), which a machine shared with other
jobs disturbs far less than wall time; wall times are recorded too. Prints a Markdown
table (median and std over interleaved repeats) and writes JSON (default
benchmarks/results/cache_checksum.json). Target: write and read overhead under 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from any2seg.store import CacheWriter, StoreSpec, open_cache
from any2seg.store import writer as store_writer

MODALITIES = ["rgb", "depth", "event", "lidar"]


class Clock:
    """CPU and wall seconds of a block."""

    def __enter__(self) -> Clock:
        self.cpu0, self.wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = time.process_time() - self.cpu0
        self.wall = time.perf_counter() - self.wall0


def build(path: Path, rows: int, dim: int, checksum: bool) -> Clock:
    from zarr.codecs import ZstdCodec

    original = store_writer.chunk_codecs
    if not checksum:
        store_writer.chunk_codecs = lambda: [ZstdCodec()]
    try:
        ids = [f"cloud/train/scene/{i:06d}" for i in range(rows)]
        spec = StoreSpec(ids=ids, modalities=MODALITIES, teacher_fingerprint={"t": 1},
                         rows_per_shard=64)
        classes = np.eye(25, dim, dtype=np.float32)
        writer = CacheWriter.create(path, spec, dim, [f"c{k}" for k in range(25)], classes)
        rng = np.random.default_rng(0)
        unit = rng.normal(size=(rows, dim)).astype(np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        with Clock() as clock:
            for shard in range(writer.num_shards):
                r = list(writer.shard_rows(shard))
                writer.write_rows(r, [f"a street with road {i}" for i in r], unit[r],
                                  {m: np.roll(unit[r], k, axis=1)
                                   for k, m in enumerate(MODALITIES)},
                                  [f"{i:032x}" for i in r])
        return clock
    finally:
        store_writer.chunk_codecs = original


def read_checked(path: Path) -> Clock:
    cache = open_cache(path)
    ids = cache.ids
    with Clock() as clock:
        cache.get(ids)
    return clock


def read_plain(path: Path) -> Clock:
    import zarr

    group = zarr.open_group(str(path), mode="r")
    arrays = [group[name] for name in ("scene", *(f"visual/{m}" for m in MODALITIES))]
    with Clock() as clock:
        for arr in arrays:
            np.asarray(arr[:], np.float32)
    return clock


def verify(path: Path) -> Clock:
    cache = open_cache(path)
    with Clock() as clock:
        assert cache.verify() == []
    return clock


def stats(clocks: list[Clock]) -> dict[str, float]:
    def spread(values: list[float]) -> float:
        return round(statistics.stdev(values) if len(values) > 1 else 0.0, 4)

    cpu, wall = [c.cpu for c in clocks], [c.wall for c in clocks]
    return {"cpu_median_s": round(statistics.median(cpu), 4), "cpu_std_s": spread(cpu),
            "wall_median_s": round(statistics.median(wall), 4), "wall_std_s": spread(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/cache_checksum.json"))
    args = parser.parse_args()
    times: dict[str, list[Clock]] = {k: [] for k in (
        "write_crc32c", "write_zstd_only", "read_plain_crc32c", "read_checked_crc32c",
        "read_plain_zstd_only", "verify_crc32c")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for rep in range(args.repeats):  # interleaved so machine load hits both alike
            with_crc, without = tmp / f"crc{rep}.zarr", tmp / f"plain{rep}.zarr"
            times["write_crc32c"].append(build(with_crc, args.rows, args.dim, True))
            times["write_zstd_only"].append(build(without, args.rows, args.dim, False))
            times["read_plain_crc32c"].append(read_plain(with_crc))
            times["read_checked_crc32c"].append(read_checked(with_crc))
            times["read_plain_zstd_only"].append(read_plain(without))
            times["verify_crc32c"].append(verify(with_crc))
    result = {k: stats(v) for k, v in times.items()}
    cpu: Callable[[str], float] = lambda k: result[k]["cpu_median_s"]  # noqa: E731
    overhead = {
        "write": cpu("write_crc32c") / cpu("write_zstd_only") - 1,
        "read_codec": cpu("read_plain_crc32c") / cpu("read_plain_zstd_only") - 1,
        "read_checked": cpu("read_checked_crc32c") / cpu("read_plain_zstd_only") - 1,
    }
    print(f"| {args.rows} rows x {len(MODALITIES) + 1} vectors of {args.dim} float16 | "
          "CPU s (median) | std | wall s (median) | std |")
    print("|---|---|---|---|---|")
    for k, v in result.items():
        print(f"| {k} | {v['cpu_median_s']:.4f} | {v['cpu_std_s']:.4f} | "
              f"{v['wall_median_s']:.4f} | {v['wall_std_s']:.4f} |")
    for k, v in overhead.items():
        print(f"{k} overhead (CPU time): {100 * v:+.1f} %")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "cache_checksum", "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "rows": args.rows, "dim": args.dim,
        "repeats": args.repeats, "times": result,
        "overhead_percent": {k: round(100 * v, 2) for k, v in overhead.items()}},
        indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
