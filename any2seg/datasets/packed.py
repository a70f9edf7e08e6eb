"""A packed data set (one HDF5 file written by `pipeline pack`) read as a folder tree.

The pack keeps every file of the source folder as its original bytes, under its
relative path. `PackedPath` gives the readers the few pathlib operations they use
(`/`, `is_dir`, `is_file`, `iterdir`, `read_text`, ...) over those paths, so the
DELIVER and MCubeS readers index and decode a pack with their own code: the same
sample ids in the same order, every load option, the same decoding and the same
errors (naming `data/deliver.h5/img/...png`).

Layout (`FORMAT`, version `VERSION`):
  /<split>/id, condition, case       (N,) str     the reader's records, for inspection
  /<split>/bytes                     (B,) uint8   the split's files, original bytes,
                                                  back to back, a sample's files together
  /<split>/<folder>/path             (N,) str     a file's path relative to the source root
  /<split>/<folder>/offset, size     (N,) int64   where its bytes lie in `bytes`
  /<split>/<folder>/sha256           (N,) hex of the bytes ("": the source lacked the file)
  /extra/...                         the same for small index files (MCubeS split lists)
  attrs: format, version, dataset, splits, source_root, layout, source_stat, content,
  files, created; per split: samples, sample_list_fingerprint (the teacher store's id hash)
`<folder>` is the first component of the relative path (img, hha, depth, ... / polL_color,
GT, ...): one table per modality folder. `bytes` is one contiguous, uncompressed HDF5
dataset (the files are PNG / .npy already), so a file is one `pread` at a known offset:
no HDF5 call and no lock on the read path (a vlen uint8 dataset per folder read ten times
slower per file; `benchmarks/packed_read.py`).

The HDF5 metadata is read once per process (read-only, lazily); each process opens its
own descriptor, so nothing opened before a `fork` (a DataLoader worker) is used after it.
"""

from __future__ import annotations

import fnmatch
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from any2seg.errors import DatasetError

FORMAT = "any2seg-packed-dataset"
VERSION = 1
EXTRA = "extra"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
SUFFIXES = (".h5", ".hdf5")

# (group, offset in the group's `bytes`, size) of a file inside the pack
Location = tuple[str, int, int]

_PACKS: dict[tuple[str, int, int, int], Pack] = {}
_OPENING = threading.Lock()  # taken to open a pack in a process, never to read one
os.register_at_fork(after_in_child=lambda: globals().update(_OPENING=threading.Lock()))


def is_pack(path: Path | str) -> bool:
    """Whether `path` is an HDF5 file (by its signature; a folder or missing path is not)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except (IsADirectoryError, FileNotFoundError, NotADirectoryError, PermissionError):
        return False


def open_pack(path: Path | str) -> Pack:
    """The `Pack` at `path` (one object per file version and process, so its index is
    built once), refusing files that are not packs in one line."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DatasetError(f"packed data set {path} does not exist; make it with `pipeline "
                           f"pack --dataset NAME --root FOLDER --out {path}`") from None
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    pack = _PACKS.get(key)
    if pack is None:
        pack = Pack(path)
        pack.check()
        _PACKS.clear()  # keep the latest only: a repacked file gets a fresh index
        _PACKS[key] = pack
    return pack


def as_root(root: Path | str | PackedPath) -> Path | PackedPath:
    """A dataset root as the readers take it: a folder `Path`, or the root of a pack when
    `root` is a packed HDF5 file (`.h5` paths that do not exist are named as packs)."""
    if isinstance(root, PackedPath):
        return root
    path = Path(root)
    if is_pack(path) or (path.suffix in SUFFIXES and not path.is_dir()):
        return open_pack(path).root
    return path


def subdirs(path: Path | PackedPath) -> list[str]:
    """Sorted names of the folders in `path` (none when it does not exist)."""
    if isinstance(path, PackedPath):
        return sorted(p.name for p in path.iterdir() if p.is_dir())
    try:
        return sorted(e.name for e in os.scandir(path) if e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def listdir(path: Path | PackedPath) -> list[str]:
    """Names of everything in the folder `path` (as `os.listdir`)."""
    if isinstance(path, PackedPath):
        if not path.is_dir():
            raise FileNotFoundError(f"no folder {path}")
        return [p.name for p in path.iterdir()]
    return os.listdir(path)


def open_binary(path: Path | PackedPath) -> Path | io.BytesIO:
    """What PIL and numpy open: the path itself, or the packed file's bytes in memory."""
    if isinstance(path, PackedPath):
        return io.BytesIO(path.read_bytes())
    return path


class Pack:
    """One packed file: its attributes, and the tree of its relative paths (built lazily)."""

    def __init__(self, path: Path | str, identity: tuple[int, int, int] | None = None,
                 bases: dict[str, int | None] | None = None) -> None:
        self.path = Path(path)
        self.identity = identity  # (inode, size, mtime_ns) when first opened
        self._bases = dict(bases or {})
        self._all_bases = bases is not None
        self._files: dict[str, Location] | None = None
        self._digests: dict[str, str] = {}
        self._dirs: dict[str, dict[str, bool]] | None = None
        self._open: _Open | None = None

    # pickled into DataLoader / dask workers without any handle: a worker opens its own
    # descriptor, checks it is the same file, and reads with `pread` alone (no HDF5 call)
    # (a Sample read in a worker carries its paths back, so this runs per sample: cheap)
    def __getstate__(self) -> dict[str, Any]:
        if self.identity is None or not self._all_bases:
            for group in self.groups():
                self.base(group)
            self._all_bases = True
        return {"path": str(self.path), "identity": self.identity, "bases": self._bases}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["identity"], state["bases"])

    def __repr__(self) -> str:
        return f"Pack({str(self.path)!r})"

    @property
    def root(self) -> PackedPath:
        return PackedPath(self, "")

    def _state(self) -> _Open:
        """This process's open file (opened on first use, and again after a fork; what a
        parent opened is never used in the child). Only opening takes a lock."""
        state = self._open
        if state is not None and state.pid == os.getpid():
            return state
        with _OPENING:
            if self._open is None or self._open.pid != os.getpid():
                state = _Open(self.path)
                if self.identity is None:
                    self.identity = state.identity
                elif state.identity != self.identity:
                    raise DatasetError(f"{self.path} was replaced while it was being read "
                                       "(packed again?); run the command again")
                self._open = state
            return self._open

    def handle(self) -> Any:
        """This process's read-only h5py file, for metadata."""
        return self._state().h5()

    def attrs(self) -> dict[str, Any]:
        return dict(self.handle().attrs)

    def check(self) -> None:
        """Refuse an HDF5 file that is not a pack of this format and version."""
        attrs = self.attrs()
        if attrs.get("format") != FORMAT:
            raise DatasetError(f"{self.path} is an HDF5 file but not a packed data set (no "
                               f"'{FORMAT}' header); make one with `pipeline pack`")
        if int(attrs.get("version", -1)) != VERSION:
            raise DatasetError(f"{self.path} is a version {attrs.get('version')} pack; this "
                               f"pipeline reads version {VERSION}: pack the data again")

    def groups(self) -> list[str]:
        """Split groups plus `extra`, as written."""
        return [*(str(s) for s in self.attrs()["splits"]), EXTRA]

    def tables(self, group: str) -> list[Any]:
        """The h5py groups holding path / offset / size / sha256 columns in `group`."""
        import h5py

        g = self.handle()[group]
        if group == EXTRA:
            return [g]
        return [g[k] for k in sorted(g) if isinstance(g[k], h5py.Group)]

    def base(self, group: str) -> int | None:
        """File offset of the group's contiguous `bytes` (None: stored chunked or filtered,
        as after an `h5repack`; those are read through h5py)."""
        if group not in self._bases:
            ds = self.handle()[f"{group}/bytes"]
            plain = ds.chunks is None and ds.compression is None and not ds.external
            offset = ds.id.get_offset() if plain else None
            self._bases[group] = None if offset is None else int(offset)
        return self._bases[group]

    def _build(self) -> None:
        files: dict[str, Location] = {}
        digests: dict[str, str] = {}
        dirs: dict[str, dict[str, bool]] = {"": {}}
        for group in self.groups():
            for table in self.tables(group):
                columns = zip(table["path"].asstr()[()], table["offset"][()].tolist(),
                              table["size"][()].tolist(), table["sha256"][()], strict=True)
                for rel, offset, size, digest in columns:
                    if not digest:  # missing in the source: missing here too
                        continue
                    files[rel] = (group, offset, size)
                    digests[rel] = digest.decode()
                    parts = rel.split("/")
                    for depth in range(len(parts)):
                        parent = "/".join(parts[:depth])
                        dirs.setdefault(parent, {})[parts[depth]] = depth < len(parts) - 1
        self._files, self._digests, self._dirs = files, digests, dirs

    @property
    def files(self) -> dict[str, Location]:
        """Relative path -> location of every file the pack holds."""
        if self._files is None:
            self._build()
        assert self._files is not None
        return self._files

    @property
    def dirs(self) -> dict[str, dict[str, bool]]:
        """Folder -> {entry name: whether it is a folder}."""
        if self._dirs is None:
            self._build()
        assert self._dirs is not None
        return self._dirs

    @property
    def digests(self) -> dict[str, str]:
        """Relative path -> hex sha256 of the file's bytes, recorded when it was packed."""
        if self._files is None:
            self._build()
        return self._digests

    def sha256(self, rel: str) -> str:
        if rel not in self.files:
            raise FileNotFoundError(f"no file {self.path}/{rel} in the pack")
        return self._digests[rel]

    def close(self) -> None:
        """Close this process's handles now (they close on garbage collection anyway)."""
        if self._open is not None and self._open.pid == os.getpid():
            self._open.close()
        self._open = None

    def read(self, location: Location, name: object = "") -> bytes:
        """A file's bytes: one `pread` (an h5py slice where `bytes` is not contiguous)."""
        group, offset, size = location
        base = self._bases[group] if group in self._bases else self.base(group)
        if base is None:
            data = self.handle()[f"{group}/bytes"][offset:offset + size].tobytes()
        else:
            data = os.pread(self._state().fd, size, base + offset)
        if len(data) != size:
            raise DatasetError(f"{name or self.path}: the pack ends early (a truncated copy?); "
                               "copy or pack it again")
        return data


class _Open:
    """A pack opened in one process: a descriptor for the bytes, h5py for metadata."""

    def __init__(self, path: Path) -> None:
        self.pid = os.getpid()
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise DatasetError(f"packed data set {path} does not exist (moved or removed "
                               "while in use?)") from None
        st = os.fstat(self.fd)
        self.identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._h5: Any = None

    def h5(self) -> Any:
        if self._h5 is None:
            import h5py

            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as exc:
                raise DatasetError(f"cannot open packed data set {self.path} ({exc}); the "
                                   "file is damaged: make it again with `pipeline pack`") from None
        return self._h5

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "pid", None) == os.getpid() and getattr(self, "fd", -1) >= 0:
            os.close(self.fd)


class PackedPath:
    """A path inside a pack, with the pathlib subset the dataset readers use."""

    __slots__ = ("pack", "rel", "_location")

    def __init__(self, pack: Pack, rel: str, location: Location | None = None) -> None:
        self.pack = pack
        self.rel = rel.strip("/")
        self._location = location

    # the location travels with the path, so a worker reads without building the index
    def __getstate__(self) -> tuple[Pack, str, Location | None]:
        if self._location is None and self.rel:
            self._location = self.pack.files.get(self.rel)
        return self.pack, self.rel, self._location

    def __setstate__(self, state: tuple[Pack, str, Location | None]) -> None:
        self.pack, self.rel, self._location = state

    def __truediv__(self, other: str | os.PathLike[str]) -> PackedPath:
        tail = os.fspath(other).replace(os.sep, "/").strip("/")
        return PackedPath(self.pack, f"{self.rel}/{tail}" if self.rel and tail else
                          self.rel or tail)

    def __str__(self) -> str:
        return f"{self.pack.path}/{self.rel}" if self.rel else str(self.pack.path)

    def __repr__(self) -> str:
        return f"PackedPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, PackedPath) and other.rel == self.rel
                and other.pack.path == self.pack.path)

    def __hash__(self) -> int:
        return hash((str(self.pack.path), self.rel))

    @property
    def name(self) -> str:
        return self.rel.rsplit("/", 1)[-1] if self.rel else self.pack.path.name

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> PackedPath:
        return PackedPath(self.pack, self.rel.rsplit("/", 1)[0] if "/" in self.rel else "")

    @property
    def location(self) -> Location | None:
        if self._location is None and self.rel:
            self._location = self.pack.files.get(self.rel)
        return self._location

    def is_file(self) -> bool:
        return self.location is not None

    def is_dir(self) -> bool:
        return self.rel in self.pack.dirs

    def exists(self) -> bool:
        return self.is_dir() or self.is_file()

    def iterdir(self) -> Iterator[PackedPath]:
        for name in sorted(self.pack.dirs.get(self.rel, {})):
            yield self / name

    def glob(self, pattern: str) -> Iterator[PackedPath]:
        """Single-level patterns joined by '/' (no '**'), as `Path.glob` matches them."""
        level = [self]
        for part in pattern.strip("/").split("/"):
            level = [child for p in level if p.is_dir() for child in p.iterdir()
                     if fnmatch.fnmatchcase(child.name, part)]
        yield from level

    def read_bytes(self) -> bytes:
        location = self.location
        if location is None:
            raise FileNotFoundError(f"no file {self} in the pack")
        return self.pack.read(location, self)

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def open(self, mode: str = "rb") -> io.BytesIO:
        if mode != "rb":
            raise ValueError(f"a packed data set is read-only (mode {mode!r})")
        return io.BytesIO(self.read_bytes())

    def sha256(self) -> str:
        """Hex sha256 of the file's bytes, recorded when it was packed."""
        return self.pack.sha256(self.rel)
