"""`pipeline pack`: a data set folder into one HDF5 file (layout in `any2seg.datasets.packed`).

On cluster file systems per-file metadata operations dominate reading ~40,000 small
PNGs; a pack is one file per data set with every file's original bytes, so reading it
decodes exactly what the folder decodes (the readers run unchanged on it).

The pack is written to `.<name>.tmp-<pid>` beside the output and renamed at the end, so
a killed run never leaves a half file under the final name; the next run removes such
leftovers and starts over (redoing costs one read of the source). A rerun on an
unchanged source does nothing; an output packed from other data is refused.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from any2seg import __version__
from any2seg.datasets.packed import EXTRA, FORMAT, VERSION, Pack, is_pack
from any2seg.diskspace import remove_stale_temps, temp_path, write_atomic
from any2seg.errors import DatasetError, PipelineError
from any2seg.guarded_file import GuardedFile

PREFETCH = 16  # files read ahead of the writer


@dataclass
class Group:
    """One HDF5 group to write: a split's rows (or the extra files), file paths by folder."""

    name: str
    ids: list[str] = field(default_factory=list)
    conditions: list[str] = field(default_factory=list)
    cases: list[str] = field(default_factory=list)
    # folder -> per row the path relative to the source root ("" when the row has none)
    folders: dict[str, list[str]] = field(default_factory=dict)

    def entries(self) -> Iterator[tuple[str, int, str]]:
        """(folder, row, relative path) row by row, so a sample's files lie together."""
        n = max((len(v) for v in self.folders.values()), default=0)
        for row in range(n):
            for folder, paths in self.folders.items():
                if paths[row]:
                    yield folder, row, paths[row]


def plan(dataset: str, root: Path, splits: Sequence[str],
         modalities: Sequence[str] | None = None) -> list[Group]:
    """What a pack of `splits` holds: per split the reader's records, every file once."""
    from any2seg import datasets

    reader = datasets.get(dataset)
    groups, extra = [], []
    for split in splits:
        if split not in reader.splits:
            raise PipelineError(f"unknown split {split!r}; {dataset} splits: "
                                f"{', '.join(reader.splits)}")
        variants, extra_files = reader.pack_index(root, split, modalities)
        group = Group(split)
        base = variants[0]
        group.ids = [r.id for r in base]
        group.conditions = [r.condition or "" for r in base]
        group.cases = [r.case or "" for r in base]
        for records in variants:
            if [r.id for r in records] != group.ids:
                raise PipelineError(f"{dataset}: the reader's pack_index gave record lists "
                                    f"with different samples for {split}; cannot pack them")
            for row, record in enumerate(records):
                for path in record.files.values():
                    rel = _relative(path, root)
                    folder = rel.split("/", 1)[0]
                    column = group.folders.setdefault(folder, [""] * len(base))
                    if column[row] not in ("", rel):
                        raise PipelineError(f"{dataset}: sample {record.id} has two files in "
                                            f"{folder}/ ({column[row]}, {rel}); cannot pack")
                    column[row] = rel
        groups.append(group)
        extra += [p for p in extra_files if _relative(p, root) not in extra]
    groups.append(Group(EXTRA, folders={"": sorted({_relative(p, root) for p in extra})}))
    return groups


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        raise PipelineError(f"{path} lies outside the root {root}; a pack holds only files "
                            "under its root") from None


def _stat(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def layout_hash(dataset: str, groups: Sequence[Group]) -> str:
    """Dataset, splits, sample ids and file paths: which data a pack holds."""
    h = hashlib.sha256(f"{dataset}\n".encode())
    for g in groups:
        h.update(f"[{g.name}]\n".encode())
        for sample_id in g.ids:
            h.update(f"{sample_id}\n".encode())
        for folder, row, rel in g.entries():
            h.update(f"{folder}\t{row}\t{rel}\n".encode())
    return h.hexdigest()


def stat_files(root: Path, groups: Sequence[Group]) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file to pack, in order; (-1, -1) where it is missing."""
    return {rel: _stat(root / rel) for g in groups for _, _, rel in g.entries()}


def stat_hash(stats: dict[str, tuple[int, int]]) -> str:
    """Paths, sizes and modification times: a cheap test that the source is unchanged."""
    h = hashlib.sha256()
    for rel, (size, mtime) in stats.items():
        h.update(f"{rel}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def content_hash(digests: dict[str, str]) -> str:
    """Paths and sha256 of the bytes: the same for any copy of the same files."""
    h = hashlib.sha256()
    for rel in sorted(digests):
        h.update(f"{rel}\t{digests[rel]}\n".encode())
    return h.hexdigest()


def _read(path: Path) -> tuple[bytes, str] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PipelineError(f"cannot read {path} ({exc.strerror}); fix the file or its "
                            "permissions and pack again") from None
    return data, hashlib.sha256(data).hexdigest()


def _ahead(paths: Sequence[Path], workers: int) -> Iterator[tuple[bytes, str] | None]:
    """Read and hash files in order with up to PREFETCH of them in flight."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: list[Future[tuple[bytes, str] | None]] = []
        for path in paths:
            pending.append(pool.submit(_read, path))
            if len(pending) >= PREFETCH:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


def _stored(out: Path) -> dict[str, Any] | None:
    """The attributes and per-file digests of an existing pack (None: not a pack)."""
    if not is_pack(out):
        return None
    existing = Pack(out)
    try:
        attrs = existing.attrs()
        if attrs.get("format") != FORMAT:
            return None
        if int(attrs.get("version", -1)) == VERSION:
            attrs["digests"] = existing.digests
        return attrs
    except (DatasetError, KeyError):
        return None
    finally:
        existing.close()


def pack(dataset: str, root: Path | str, out: Path | str,
         splits: Sequence[str] | None = None, modalities: Sequence[str] | None = None, *,
         overwrite: bool = False, workers: int = 4,
         progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Pack `splits` of `dataset` at `root` into `out` unless it already holds them.

    Returns a report: status ("written" or "up-to-date"), files, bytes, seconds, and per
    split the sample count and the teacher store's sample-list fingerprint of its ids.
    """
    from any2seg import datasets

    start = time.perf_counter()
    root, out = Path(root), Path(out)
    reader = datasets.get(dataset)
    if is_pack(root):
        raise PipelineError(f"{root} is already a packed data set; pass its source folder "
                            "as --root")
    if out.resolve() == root.resolve() or out.is_dir():
        raise PipelineError(f"--out {out} is a folder; give the path of the .h5 file to write")
    splits = list(splits or reader.splits)
    groups = plan(dataset, root, splits, modalities)
    layout = layout_hash(dataset, groups)
    stats = stat_files(root, groups)
    source_stat = stat_hash(stats)
    from any2seg.store import sample_list_fingerprint

    report: dict[str, Any] = {
        "out": str(out), "dataset": dataset, "root": str(root),
        "splits": {g.name: {"samples": len(g.ids), "sample_list_fingerprint":
                            sample_list_fingerprint(g.ids)} for g in groups if g.name != EXTRA}}
    if out.exists() and not overwrite:
        stored = _stored(out)
        if stored is None:
            raise PipelineError(f"{out} exists and is not a packed data set; refusing to "
                                "replace it: choose another --out or remove it yourself")
        reason = _differs(stored, dataset, splits, layout)
        if reason is None and stored.get("source_stat") != source_stat:
            changed = _changed_files(root, stored["digests"], workers)
            if changed:
                reason = (f"{len(changed)} file(s) changed since it was packed, e.g. "
                          f"{changed[0]}")
        if reason is not None:
            raise PipelineError(f"{out} was packed from other data ({reason}); pass "
                                "--overwrite to pack over it, or choose another --out")
        return {**report, "status": "up-to-date", "files": int(stored.get("files", 0)),
                "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - start, 2)}

    remove_stale_temps(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        written.update(_write(tmp, dataset, root, groups, stats, splits, modalities, layout,
                              source_stat, workers, progress))

    try:  # refused before it starts when it cannot fit: HDF5 may crash (SIGSEGV) rather
        # than fail on a full disk
        write_atomic(out, write, _pack_bytes(stats), f"the pack {out.name}")
    except OSError as exc:
        if exc.filename is None or str(temp_path(out)) in str(exc):
            # h5py's write errors carry HDF5's whole error stack: keep its first line
            raise PipelineError(f"could not write --out {out} ({str(exc).splitlines()[0]}); "
                                "nothing was left there: check the disk and rerun") from exc
        raise
    return {**report, **written, "status": "written", "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - start, 2)}


def _pack_bytes(stats: dict[str, tuple[int, int]]) -> int:
    """Bytes the pack takes, near enough: the files it copies, plus 5% and a table row each."""
    return int(sum(max(size, 0) for size, _ in stats.values()) * 1.05) + 256 * len(stats)


def _differs(stored: dict[str, Any], dataset: str, splits: Sequence[str],
             layout: str) -> str | None:
    if "digests" not in stored:
        return f"a version {stored.get('version')} pack"
    if stored.get("dataset") != dataset:
        return f"dataset {stored.get('dataset')}, not {dataset}"
    if [str(s) for s in stored.get("splits", [])] != list(splits):
        return (f"splits {','.join(str(s) for s in stored['splits'])}, not "
                f"{','.join(splits)}")
    if stored.get("layout") != layout:
        return f"other samples or files than {stored.get('source_root')} has now"
    return None


def _changed_files(root: Path, digests: dict[str, str], workers: int) -> list[str]:
    """Stored files whose bytes at `root` differ now (hashes the source once)."""
    rels = sorted(digests)
    changed = []
    for rel, got in zip(rels, _ahead([root / r for r in rels], workers), strict=True):
        if got is None or got[1] != digests[rel]:
            changed.append(rel)
    return changed


def _write(tmp: Path, dataset: str, root: Path, groups: Sequence[Group],
           stats: dict[str, tuple[int, int]], splits: Sequence[str],
           modalities: Sequence[str] | None, layout: str, source_stat: str, workers: int,
           progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    """Write the pack at `tmp`: per group one contiguous `bytes` and a table per folder."""
    import h5py

    from any2seg.store import sample_list_fingerprint

    text = h5py.string_dtype()
    todo = [(g, folder, row, rel) for g in groups for folder, row, rel in g.entries()
            if stats[rel][0] >= 0]
    missing = [rel for rel, (size, _) in stats.items() if size < 0]
    digests: dict[str, str] = {}
    done = 0
    # HDF5 writes through GuardedFile: a failed write(2) (another process filled the disk)
    # crashes HDF5's C layer on close; GuardedFile keeps it from HDF5 and `check` raises it
    with GuardedFile(tmp) as raw, h5py.File(raw, "w") as f:
        where: dict[str, tuple[Any, int]] = {}  # rel -> (sha256 column, row)
        offsets: dict[str, int] = {}
        blobs = {}
        for g in groups:
            h = f.create_group(g.name)
            if g.name != EXTRA:
                h.create_dataset("id", data=g.ids, dtype=text)
                h.create_dataset("condition", data=g.conditions, dtype=text)
                h.create_dataset("case", data=g.cases, dtype=text)
                h.attrs["samples"] = len(g.ids)
                h.attrs["sample_list_fingerprint"] = sample_list_fingerprint(g.ids)
            position = 0
            columns: dict[str, tuple[np.ndarray, np.ndarray]] = {
                folder: (np.zeros(len(paths), np.int64), np.zeros(len(paths), np.int64))
                for folder, paths in g.folders.items()}
            for folder, row, rel in g.entries():  # row by row: a sample's files together
                size = max(stats[rel][0], 0)
                columns[folder][0][row], columns[folder][1][row] = position, size
                offsets[rel] = position
                position += size
            blobs[g.name] = h.create_dataset("bytes", (position,), dtype=np.uint8)
            for folder, paths in g.folders.items():
                table = h.create_group(folder) if folder else h
                table.create_dataset("path", data=paths, dtype=text)
                table.create_dataset("offset", data=columns[folder][0])
                table.create_dataset("size", data=columns[folder][1])
                sha = table.create_dataset("sha256", (len(paths),), dtype="S64")
                for row, rel in enumerate(paths):
                    if rel:
                        where[rel] = (sha, row)
        for (g, _, _, rel), got in zip(todo, _ahead([root / e[3] for e in todo], workers),
                                       strict=True):
            if got is None or len(got[0]) != stats[rel][0]:
                raise PipelineError(f"{root / rel} changed while it was being packed; pack "
                                    "again when the data set is not being written")
            data, digest = got
            if data:
                blobs[g.name][offsets[rel]:offsets[rel] + len(data)] = np.frombuffer(
                    data, dtype=np.uint8)
            sha, row = where[rel]
            sha[row] = digest.encode()
            digests[rel] = digest
            done += 1
            raw.check()  # stop at the first failed write
            if progress:
                progress(done, len(todo))
        f.attrs.update({
            "format": FORMAT, "version": VERSION, "dataset": dataset, "splits": list(splits),
            "modalities": list(modalities) if modalities else [],
            "source_root": str(root.resolve()), "layout": layout, "source_stat": source_stat,
            "content": content_hash(digests), "files": len(digests),
            "source_bytes": sum(stats[r][0] for r in digests),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "packer": f"any2seg-pipeline {__version__}",
        })
    raw.check()  # a write of the metadata on closing
    return {"files": len(digests), "source_bytes": sum(stats[r][0] for r in digests),
            "missing": missing, "content": content_hash(digests)}
