"""Reading the generated sample from its folder vs from a pack (`pipeline pack`).

For each image size: files and bytes on disk, time to pack, and samples/s through a torch
DataLoader with 0, 1 and 2 workers (every modality and the label decoded, as training
reads them), warm (page cache full) and cold (each file's pages dropped with
posix_fadvise(DONTNEED) before every pass; the residency left is measured with
mincore and reported, since some file systems ignore the advice). Also the layouts the
pack could have used: a vlen uint8 dataset per folder (read cost per file) and decoded
arrays in chunked, compressed HDF5 datasets (size and samples/s).

Prints tables and writes JSON (default benchmarks/results/packed_read.json). Targets
(issue 18): packed reads at least as fast as the folder on a warm cache; 1 file per
data set instead of thousands. On a shared or loaded machine the numbers wander:
rerun on a quiet one with the same command.

    python benchmarks/packed_read.py [--sizes 256,512] [--workers 0,1,2] [--repeats 3]
                                     [--scratch DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from any2seg import datasets
from any2seg.datasets.packed import open_pack
from any2seg.pack import pack
from any2seg.synth import SampleSpec, make_sample

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.mmap.restype = ctypes.c_void_p
_LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


# ---------------------------------------------------------------------------------------
# page cache
# ---------------------------------------------------------------------------------------
def files_of(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def drop_cache(paths: Iterable[Path]) -> None:
    """Ask the kernel to drop the cached pages of each file (no root needed)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: Iterable[Path]) -> float:
    """Share of the files' pages in the page cache (mincore)."""
    page = mmap.PAGESIZE
    resident = total = 0
    for p in paths:
        size = p.stat().st_size
        if not size:
            continue
        pages = (size + page - 1) // page
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                continue
            vec = (ctypes.c_ubyte * pages)()
            if _LIBC.mincore(ctypes.c_void_p(addr), size, vec) == 0:
                resident += sum(v & 1 for v in vec)
                total += pages
            _LIBC.munmap(ctypes.c_void_p(addr), size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------
def first(item: Any) -> Any:
    return item


def loader_rate(dataset: Any, workers: int) -> float:
    """Samples/s of one pass through a DataLoader (worker start-up included)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False,
                                         num_workers=workers, collate_fn=first)
    start = time.perf_counter()
    n = sum(1 for _ in loader)
    return n / (time.perf_counter() - start)


def passes(dataset_fn: Callable[[], Any], paths: list[Path], workers: int, repeats: int,
           cold: bool) -> tuple[list[float], float]:
    rates, residency = [], []
    if not cold:
        loader_rate(dataset_fn(), workers)  # warm the cache
    for _ in range(repeats):
        if cold:
            drop_cache(paths)
            residency.append(resident_fraction(paths))
        rates.append(loader_rate(dataset_fn(), workers))
    return rates, max(residency) if residency else 1.0


class Arrays(torch.utils.data.Dataset):
    """The rejected layout: decoded arrays in chunked, compressed HDF5 datasets."""

    def __init__(self, path: Path, split: str, modalities: list[str]) -> None:
        self.path, self.split, self.modalities = path, split, modalities
        self._file: Any = None
        self._pid = -1
        with h5py.File(path, "r") as f:
            self.n = f[f"{split}/label"].shape[0]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        g = self._file[self.split]
        out = {m: g[m][i] for m in self.modalities}
        out["label"] = g["label"][i].astype(np.int64)
        return out


def write_arrays(samples: Any, path: Path, compression: str, opts: Any) -> float:
    """Decode every sample once and store the arrays; returns seconds."""
    start = time.perf_counter()
    first_sample = samples[0]
    with h5py.File(path, "w") as f:
        g = f.create_group("all")
        sets = {}
        for m, x in first_sample.modalities.items():
            sets[m] = g.create_dataset(m, (len(samples), *x.shape), dtype=x.dtype,
                                       chunks=(1, *x.shape), compression=compression,
                                       compression_opts=opts)
        sets["label"] = g.create_dataset("label", (len(samples), *first_sample.label.shape),
                                         dtype=np.uint8, chunks=(1, *first_sample.label.shape),
                                         compression=compression, compression_opts=opts)
        for i, s in enumerate(samples):
            for m, x in s.modalities.items():
                sets[m][i] = x
            sets["label"][i] = s.label.astype(np.uint8)
    return time.perf_counter() - start


def per_file_read_us(pack_path: Path, folder: Path, scratch: Path) -> dict[str, float]:
    """Microseconds to fetch one file's bytes (warm cache): folder, pack, vlen dataset."""
    p = open_pack(pack_path)
    rels = list(p.files)
    vlen_path = scratch / "vlen.h5"
    with h5py.File(vlen_path, "w") as f:
        ds = f.create_dataset("bytes", (len(rels),), dtype=h5py.vlen_dtype(np.uint8))
        for i, rel in enumerate(rels):
            ds[i] = np.frombuffer(p.read(p.files[rel]), dtype=np.uint8)
    timings = {}
    for name, fetch in (
            ("folder", lambda: [(folder / r).read_bytes() for r in rels]),
            ("pack (contiguous bytes, pread)", lambda: [p.read(p.files[r]) for r in rels]),
            ("vlen uint8 dataset (h5py)", lambda: _read_vlen(vlen_path, len(rels)))):
        fetch()
        start = time.perf_counter()
        for _ in range(3):
            fetch()
        timings[name] = round((time.perf_counter() - start) / 3 / len(rels) * 1e6, 1)
    vlen_bytes = vlen_path.stat().st_size
    vlen_path.unlink()
    timings["vlen_file_bytes"] = vlen_bytes
    return timings


def _read_vlen(path: Path, n: int) -> None:
    with h5py.File(path, "r") as f:
        ds = f["bytes"]
        for i in range(n):
            ds[i].tobytes()


def disk_usage(path: Path) -> tuple[int, int, int]:
    """(files, bytes allocated on disk, apparent bytes)."""
    files = files_of(path)
    return (len(files), sum(p.stat().st_blocks * 512 for p in files),
            sum(p.stat().st_size for p in files))


# ---------------------------------------------------------------------------------------
def bench(size: int, workers: list[int], repeats: int, scratch: Path) -> dict[str, Any]:
    folder = scratch / f"sample-{size}"
    make_sample(folder, SampleSpec(size=size))
    packed = scratch / f"sample-{size}.h5"
    packed.unlink(missing_ok=True)
    drop_cache(files_of(folder))
    start = time.perf_counter()
    pack("sample", folder, packed)
    pack_s = time.perf_counter() - start
    start = time.perf_counter()
    pack("sample", folder, packed)
    rerun_s = time.perf_counter() - start
    splits = "train,val,test"
    row: dict[str, Any] = {"size": size, "pack_s": round(pack_s, 2),
                           "pack_rerun_s": round(rerun_s, 2)}
    for name, source in (("folder", folder), ("pack", packed)):
        n_files, on_disk, apparent = disk_usage(source)
        entry: dict[str, Any] = {"files": n_files, "bytes_on_disk": on_disk,
                                 "apparent_bytes": apparent}
        paths = files_of(source)
        for w in workers:
            for temp in ("warm", "cold"):
                rates, residency = passes(lambda s=source: datasets.load("sample", s, splits),
                                          paths, w, repeats, temp == "cold")
                entry[f"{temp}_w{w}"] = {"median": round(statistics.median(rates), 1),
                                         "min": round(min(rates), 1),
                                         "max": round(max(rates), 1)}
                if temp == "cold":
                    entry[f"cold_w{w}"]["resident_after_drop"] = round(residency, 3)
        row[name] = entry

    # the layouts the pack did not take
    samples = datasets.load("sample", folder, splits)
    row["per_file_read_us"] = per_file_read_us(packed, folder, scratch)
    row["arrays"] = {}
    for label, compression, opts in (("lzf", "lzf", None), ("gzip-1", "gzip", 1)):
        path = scratch / f"arrays-{size}-{label}.h5"
        write_s = write_arrays(samples, path, compression, opts)
        data = Arrays(path, "all", list(samples.modalities))
        rates, _ = passes(lambda d=data: d, [path], 0, repeats, cold=False)
        row["arrays"][label] = {"bytes": path.stat().st_size, "write_s": round(write_s, 2),
                                "warm_w0": round(statistics.median(rates), 1)}
        path.unlink()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", type=Path, default=None,
                        help="Folder for the data (default: a temporary folder, removed).")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/packed_read.json"))
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    load = os.getloadavg()
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="packed-read-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench(int(s), workers, args.repeats, scratch) for s in args.sizes.split(",")]
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    load_after = os.getloadavg()

    print(f"\nsamples/s, median of {args.repeats} (min-max); load average {load[0]:.1f} before, "
          f"{load_after[0]:.1f} after, on {os.cpu_count()} cores")
    head = ["size", "source", "files", "MB on disk"]
    head += [f"{t} w{w}" for t in ("warm", "cold") for w in workers]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        for name in ("folder", "pack"):
            e = r[name]
            cells = [str(r["size"]), name, str(e["files"]), f"{e['bytes_on_disk'] / 1e6:.1f}"]
            cells += [f"{e[f'{t}_w{w}']['median']} ({e[f'{t}_w{w}']['min']}-"
                      f"{e[f'{t}_w{w}']['max']})" for t in ("warm", "cold") for w in workers]
            print(" | ".join(cells))
    print("\nsize | pack (s) | rerun (s) | cold residency after drop (folder, pack)")
    for r in rows:
        res = [r[n][f"cold_w{workers[0]}"]["resident_after_drop"] for n in ("folder", "pack")]
        print(f"{r['size']} | {r['pack_s']} | {r['pack_rerun_s']} | {res[0]}, {res[1]}")
    print("\nlayouts: size | read one file's bytes (us): folder, pack, vlen | vlen file MB | "
          "decoded arrays lzf / gzip-1: MB, samples/s (w0 warm)")
    for r in rows:
        t, a = r["per_file_read_us"], r["arrays"]
        print(f"{r['size']} | {t['folder']}, {t['pack (contiguous bytes, pread)']}, "
              f"{t['vlen uint8 dataset (h5py)']} | {t['vlen_file_bytes'] / 1e6:.1f} | "
              f"{a['lzf']['bytes'] / 1e6:.1f} MB {a['lzf']['warm_w0']}/s, "
              f"{a['gzip-1']['bytes'] / 1e6:.1f} MB {a['gzip-1']['warm_w0']}/s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "packed_read", "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "python": platform.python_version(), "h5py": h5py.__version__,
        "load_average_before": load, "load_average_after": load_after,
        "repeats": args.repeats, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
