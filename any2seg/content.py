"""Content hashes of the files a cached row is computed from.

A row of the teacher cache is a function of its sample's files (every modality the
teacher reads and the label the template captioner reads), so the row records a hash of
their bytes: editing an image in place (same name) changes the hash and a rerun of
`pipeline cache-teacher` recomputes exactly that row.

The hashes are of the stored bytes, never of decoded arrays, and never of paths:

    file digest   = sha256(file bytes), hex
    sample digest = sha256("<kind>\\t<file digest>\\n" for each kind in sorted order), hex[:32]

where `kind` is the key in `Record.files` ("rgb", "depth", "label", ...). Anything that
holds the identical original bytes (another root, a packed archive that keeps each
file's bytes) reproduces the same digests with `sample_digest`.

Hashing a whole data set costs one read of it, which stage one shares with decoding
(`FileHashes.learn`); `FileHashes` remembers each file's digest by (path, size,
mtime_ns) in a JSON file, so an unchanged rerun only `stat`s.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from any2seg.errors import PipelineError
from any2seg.progress import progress

DIGEST_VERSION = "sha256-file-bytes v1"
_CHUNK = 1 << 20


def file_digest(path: Path | str) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def sample_digest(file_digests: Mapping[str, str]) -> str:
    """The row's input hash from {kind: file digest} (see the module docstring)."""
    h = hashlib.sha256()
    for kind in sorted(file_digests):
        h.update(f"{kind}\t{file_digests[kind]}\n".encode())
    return h.hexdigest()[:32]


def from_read(files: Mapping[str, Path], read: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """A sample's input hash from the digests recorded while decoding it ({absolute path:
    sha256}, `recording_digests`), and the digests of files the decoder did not read
    through `any2seg.datasets.decode` (hashed here, a second read)."""
    extra: dict[str, str] = {}
    digests = {}
    for kind, p in files.items():
        if hasattr(p, "sha256"):
            digests[kind] = p.sha256()  # type: ignore[attr-defined]
            continue
        path = _key(p)
        if path not in read and path not in extra:
            extra[path] = file_digest(path)
        digests[kind] = read.get(path) or extra[path]
    return sample_digest(digests), extra


def _key(path: object) -> str:
    """Absolute path of a file, or the `pack.h5/rel/path` name of a packed one."""
    return str(path) if hasattr(path, "sha256") else os.path.abspath(path)  # type: ignore[arg-type]


class FileHashes:
    """File digests remembered by (path, size, mtime_ns) in `cache_file` (may be None).

    `lookup` only `stat`s; a file whose digest is not remembered is hashed either by
    `complete` (a read for hashing only) or, in stage one, from the read that decodes it
    (`any2seg.datasets.decode.recording_digests`, handed to `learn`). Either way the
    digest is remembered under the size and mtime `lookup` saw before the read."""

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file
        self.known: dict[str, list] = {}
        self.pending: dict[str, list] = {}  # path -> [size, mtime_ns] of unknown digests
        self.hashed = 0  # files hashed by this instance (0 on an unchanged rerun)
        if cache_file is not None and cache_file.is_file():
            try:
                data = json.loads(cache_file.read_text())
                if data.get("version") == DIGEST_VERSION:
                    self.known = dict(data.get("files", {}))
            except (OSError, ValueError, AttributeError):
                self.known = {}  # a damaged remembered-hash file only costs a rehash

    def _lookup(self, path: str) -> str | None:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise PipelineError(f"cannot read {path} to hash it ({exc.strerror}); restore "
                                "the file or pass --skip-bad") from None
        key = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(path)
        if entry is not None and entry[:2] == key:
            self.pending.pop(path, None)
            return entry[2]
        self.pending[path] = key
        return None

    def _hash(self, path: str) -> str:
        try:
            return file_digest(path)
        except OSError as exc:
            raise PipelineError(f"cannot read {path} to hash it ({exc.strerror}); restore "
                                "the file or pass --skip-bad") from None

    def _known(self, p: object) -> str | None:
        if hasattr(p, "sha256"):  # PackedPath: digest recorded at pack time
            return p.sha256()  # type: ignore[attr-defined]
        entry = self.known.get(_key(p))
        return None if entry is None or _key(p) in self.pending else entry[2]

    def _sample(self, f: Mapping[str, Path]) -> str | None:
        digests = {k: self._known(p) for k, p in f.items()}
        if any(d is None for d in digests.values()):
            return None
        return sample_digest(digests)  # type: ignore[arg-type]

    def lookup(self, files: Sequence[Mapping[str, Path]]) -> list[str | None]:
        """One input hash per sample from remembered (and packed) digests; reads nothing.
        None for a sample with a file whose digest is not remembered for its current size
        and mtime (`complete` or `learn` fills it)."""
        for path in sorted({_key(p) for f in files for p in f.values()
                            if not hasattr(p, "sha256")}):
            self._lookup(path)
        return [self._sample(f) for f in files]

    def complete(self, files: Sequence[Mapping[str, Path]], hashes: list[str | None],
                 rows: Sequence[int], workers: int = 4, show: bool = True) -> None:
        """Fill the None `hashes[r]` of `rows` by reading their unknown files to hash them."""
        rows = [r for r in rows if hashes[r] is None]
        todo = sorted({_key(p) for r in rows for p in files[r].values()
                       if not hasattr(p, "sha256")} & self.pending.keys())
        if todo:
            with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
                results = pool.map(self._hash, todo)
                digests = dict(zip(todo, progress(
                    results, total=len(todo), desc="hashing input files", unit="file",
                    enabled=show and len(todo) >= 500, leave=False), strict=True))
            self.learn(digests)
        for r in rows:
            hashes[r] = self._sample(files[r])

    def learn(self, digests: Mapping[str, str]) -> None:
        """Remember digests of files read elsewhere ({absolute path: sha256}), under the
        size and mtime `lookup` saw before they were read; others are ignored."""
        for path, digest in digests.items():
            key = self.pending.pop(path, None)
            if key is not None:
                self.known[path] = [*key, digest]
                self.hashed += 1

    def sample_digests(self, files: Sequence[Mapping[str, Path]], workers: int = 4,
                       show: bool = True) -> list[str]:
        """One input hash per sample, from its {kind: path}; unchanged files are not read.

        A file inside a pack (`PackedPath`) takes the sha256 the pack recorded for its
        bytes, so a store built from a pack has the row hashes of one built from the folder."""
        hashes = self.lookup(files)
        self.complete(files, hashes, range(len(files)), workers, show)
        return hashes  # type: ignore[return-value]

    def save(self) -> bool:
        """Write the remembered digests (atomic); False when the folder is not writable."""
        if self.cache_file is None or not self.hashed:
            return False
        tmp = self.cache_file.with_name(f"{self.cache_file.name}.{uuid.uuid4().hex}.tmp")
        try:
            # files by path: the same bytes whatever order the digests came in
            tmp.write_text(json.dumps({"version": DIGEST_VERSION,
                                       "files": dict(sorted(self.known.items()))}))
            os.replace(tmp, self.cache_file)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True
