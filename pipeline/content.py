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

Hashing a whole data set once costs one read of it; `FileHashes` remembers each file's
digest by (path, size, mtime_ns) in a JSON file, so an unchanged rerun only `stat`s.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.progress import progress

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


def _key(path: object) -> str:
    """Absolute path of a file, or the `pack.h5/rel/path` name of a packed one."""
    return str(path) if hasattr(path, "sha256") else os.path.abspath(path)  # type: ignore[arg-type]


class FileHashes:
    """File digests remembered by (path, size, mtime_ns) in `cache_file` (may be None)."""

    def __init__(self, cache_file: Path | None = None) -> None:
        self.cache_file = cache_file
        self.known: dict[str, list] = {}
        self.hashed = 0  # files read by this instance (0 on an unchanged rerun)
        if cache_file is not None and cache_file.is_file():
            try:
                data = json.loads(cache_file.read_text())
                if data.get("version") == DIGEST_VERSION:
                    self.known = dict(data.get("files", {}))
            except (OSError, ValueError, AttributeError):
                self.known = {}  # a damaged remembered-hash file only costs a rehash

    def _lookup(self, path: str) -> tuple[str | None, list]:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise PipelineError(f"cannot read {path} to hash it ({exc.strerror}); restore "
                                "the file or pass --skip-bad") from None
        key = [st.st_size, st.st_mtime_ns]
        entry = self.known.get(path)
        if entry is not None and entry[:2] == key:
            return entry[2], key
        return None, key

    def _hash(self, path: str, key: list) -> str:
        try:
            digest = file_digest(path)
        except OSError as exc:
            raise PipelineError(f"cannot read {path} to hash it ({exc.strerror}); restore "
                                "the file or pass --skip-bad") from None
        self.known[path] = [*key, digest]
        return digest

    def sample_digests(self, files: Sequence[Mapping[str, Path]], workers: int = 4,
                       show: bool = True) -> list[str]:
        """One input hash per sample, from its {kind: path}; unchanged files are not read.

        A file inside a pack (`PackedPath`) takes the sha256 the pack recorded for its
        bytes, so a store built from a pack has the row hashes of one built from the folder."""
        digests: dict[str, str] = {}
        for f in files:
            for p in f.values():
                if hasattr(p, "sha256"):  # PackedPath: digest recorded at pack time
                    digests[_key(p)] = p.sha256()
        flat = sorted({_key(p) for f in files for p in f.values()} - digests.keys())
        todo = []
        for path in flat:
            digest, key = self._lookup(path)
            if digest is None:
                todo.append((path, key))
            else:
                digests[path] = digest
        if todo:
            with ThreadPoolExecutor(max(1, workers)) as pool:  # hashlib releases the GIL
                results = pool.map(lambda pk: self._hash(*pk), todo)
                for (path, _), digest in zip(todo, progress(
                        results, total=len(todo), desc="hashing input files", unit="file",
                        enabled=show and len(todo) >= 500, leave=False), strict=True):
                    digests[path] = digest
            self.hashed += len(todo)
        return [sample_digest({k: digests[_key(p)] for k, p in f.items()}) for f in files]

    def save(self) -> bool:
        """Write the remembered digests (atomic); False when the folder is not writable."""
        if self.cache_file is None or not self.hashed:
            return False
        tmp = self.cache_file.with_name(f"{self.cache_file.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(json.dumps({"version": DIGEST_VERSION, "files": self.known}))
            os.replace(tmp, self.cache_file)
        except OSError:
            tmp.unlink(missing_ok=True)
            return False
        return True
