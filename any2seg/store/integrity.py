"""Integrity of a store: per-chunk checksums, damage found in checked reads, the whole-store scan.

Every chunk carries a CRC32C (zarr's `crc32c` codec inside the shard, after zstd), so a
flipped or truncated byte fails to decode; a missing or empty shard file, which zarr
would read as fill values (zeros), counts as damage wherever a `done` row needs it.
Readers turn damage into one `StoreDamage` line naming the arrays, rows and the repair
command; `scan` / `verify` check a whole store (`pipeline cache-verify`), and the writer's
`plan` turns what they find into the rows `--repair` recomputes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from any2seg.errors import PipelineError
from any2seg.store.schema import per_class_table

SCAN_BLOCK = 16  # shards read per step when scanning (a failing block is read shard by shard)


def chunk_codecs() -> list[Any]:
    """The codecs of every array: zstd, then the CRC32C that makes damage detectable."""
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(), Crc32cCodec()]


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
        return not per_class_table(self.array)

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


def shard_blocks(shards: Sequence[int]) -> list[list[int]]:
    """Sorted shard numbers cut into contiguous runs of at most `SCAN_BLOCK`."""
    out: list[list[int]] = []
    for s in sorted(shards):
        if out and out[-1][-1] == s - 1 and len(out[-1]) < SCAN_BLOCK:
            out[-1].append(s)
        else:
            out.append([s])
    return out


class CheckedShards:
    """Checked reads by shard, mixed into `TeacherCache`: every chunk read is verified, and
    a shard that fails is reported as a `Damage` instead of being returned as zeros.

    Needs `path`, `arrays` (name -> zarr array), `n`, `rows_per_shard`, `row_arrays`,
    `codebook_arrays` and `repair_command()` from the class it is mixed into."""

    path: Path
    arrays: dict[str, Any]
    n: int
    rows_per_shard: int
    row_arrays: list[str]
    codebook_arrays: list[str]
    repair_command: Callable[[], str]

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
        if per_class_table(name):
            k = int(self.arrays[name].shape[0])
            return lambda s: range(0, k)
        return self.shard_rows

    def _shards_of(self, name: str) -> list[int]:
        if per_class_table(name):
            return [0] if self.arrays[name].shape[0] else []
        return list(range(self.num_shards))

    def _done_shards(self, shards: Sequence[int], damages: list[Damage]) -> set[int]:
        """Those of `shards` holding a done row, or whose `done` chunk is unreadable."""
        done = np.zeros(self.n, dtype=bool)
        for block in shard_blocks(shards):
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
            if per_class_table(name):
                need: Callable[[int], bool] = lambda _s: True  # noqa: E731
                name_shards = self._shards_of(name)
            elif name in ("sample_id", "done"):
                need = lambda _s, _n=name: _n != "done"  # noqa: E731  (absent: not done)
                name_shards = shards
            else:
                if needed is None:  # shards holding a done row need every row array
                    needed = self._done_shards(shards, damages)
                need, name_shards = needed.__contains__, shards
            for block in shard_blocks(name_shards):
                self._read_shards(name, block, need, damages, out[name])
        if damages:
            raise StoreDamage(self.path, damages, self.repair_command())
        return out


    # -- whole-store check ------------------------------------------------------------------
    def scan(self, show: bool = False) -> tuple[np.ndarray, list[Damage]]:
        """Read every chunk once: the `done` flags (False where unreadable) and every damage.

        Reads blocks of shards (one block at a time when all is well) so a complete
        DELIVER-size store scans in about a second."""
        from any2seg.progress import progress

        damages: list[Damage] = []
        n_shards = self.num_shards
        blocks = shard_blocks(range(n_shards))
        static = [(name, shard_blocks(self._shards_of(name)))
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
