"""Decoding of dataset image files into arrays, with errors that name the file.

Every reader goes through here so that a corrupt PNG, a truncated file or an
unexpected channel count produces the same one-line `DatasetError`. A path may be a
file inside a packed data set (`PackedPath`): its original bytes decode the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from any2seg.datasets.packed import PackedPath, open_binary
from any2seg.errors import DatasetError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) that libpng returns exactly as PIL does: 8-bit grey, RGB,
# grey + alpha, RGBA and 16-bit grey (PIL: I;16). Palette, 1/2/4-bit and 16-bit colour
# images, and any file with a tRNS chunk, keep PIL's conversions.
_LIBPNG_SAME = {(8, 0), (8, 2), (8, 4), (8, 6), (16, 0)}
# {absolute path: sha256} of the files read in this thread inside `recording_digests`
_RECORDING: ContextVar[dict[str, str] | None] = ContextVar("recorded_digests", default=None)


@contextmanager
def recording_digests() -> Iterator[dict[str, str]]:
    """Within the block, every file this thread reads through `read_png` / `read_npy` adds
    {absolute path: sha256 of the bytes read} to the yielded dict: the content hash of
    `any2seg.content` from the read that decodes the file, so stage one reads each input
    file once. Packed files are not hashed (their pack records their sha256)."""
    seen: dict[str, str] = {}
    token = _RECORDING.set(seen)
    try:
        yield seen
    finally:
        _RECORDING.reset(token)


def _read(path: Path | PackedPath, digest: list[str] | None = None) -> bytes:
    """A file's bytes, hashed for `digest` and for an active `recording_digests`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path} ({exc.strerror}); restore the file, or pass "
                           "--skip-bad to skip this sample") from exc
    seen = _RECORDING.get()
    if digest is not None or (seen is not None and not isinstance(path, PackedPath)):
        hexdigest = hashlib.sha256(data).hexdigest()
        if digest is not None:
            digest.append(hexdigest)
        if seen is not None and not isinstance(path, PackedPath):
            seen[os.path.abspath(path)] = hexdigest
    return data


def _libpng(data: bytes) -> np.ndarray | None:
    """`torchvision.io.decode_png` (libpng, the official DELIVER loader's decoder; ~1.2x
    faster than PIL on 1042 px frames, benchmarks/hot_paths.py) where it returns the array
    PIL returns; None where PIL should decode (other kinds, or anything libpng refuses,
    so that a damaged file gets PIL's error)."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or \
            (data[24], data[25]) not in _LIBPNG_SAME:
        return None
    idat = data.find(b"IDAT")
    if idat < 0 or b"tRNS" in data[:idat]:
        return None
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_png
    except ImportError:  # pragma: no cover - torchvision is in the lock
        return None
    try:
        decoded = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                             ImageReadMode.UNCHANGED)
    except RuntimeError:
        return None
    arr = decoded.permute(1, 2, 0).numpy()  # libpng's own H x W x C buffer, no copy
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


def read_png(path: Path | PackedPath, digest: list[str] | None = None) -> np.ndarray:
    """Decode an image file exactly as stored: H x W (grey) or H x W x C, uint8 or uint16.

    With `digest` (a list), the sha256 of the bytes just read is appended to it: the
    content hash of `any2seg.content` from the same read as the decoding."""
    path = path if isinstance(path, PackedPath) else Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    data = _read(path, digest)
    fast = _libpng(data)
    if fast is not None:
        return fast
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img)
                if arr.dtype != np.uint16:
                    if arr.min() < 0 or arr.max() > 65535:
                        raise DatasetError(f"{path}: 32-bit image values out of 16-bit range")
                    arr = arr.astype(np.uint16)
                return arr
            if img.mode == "P":
                img = img.convert("RGBA" if "transparency" in img.info else "RGB")
            elif img.mode not in ("L", "LA", "RGB", "RGBA"):
                img = img.convert("RGB")
            return np.asarray(img)
    except DatasetError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"cannot decode {path} ({exc}); the file is corrupt or truncated: "
            "re-download or regenerate it, or pass --skip-bad to skip this sample"
        ) from exc


def read_npy(path: Path | PackedPath) -> np.ndarray:
    """Load a `.npy` array with a file-naming error on failure."""
    path = path if isinstance(path, PackedPath) else Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    try:
        if _RECORDING.get() is not None and not isinstance(path, PackedPath):
            return np.load(io.BytesIO(_read(path)), allow_pickle=False)
        return np.load(open_binary(path), allow_pickle=False)
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(
            f"cannot read {path} ({exc}); the file is corrupt or truncated: "
            "re-download it, or pass --skip-bad to skip this sample"
        ) from exc


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Bring 16-bit data to 8 bits by the full-range linear map (65535 -> 255)."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:
        return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    raise TypeError(f"expected uint8 or uint16 image, got {arr.dtype}")


def to_rgb3(arr: np.ndarray, path: Path, keep_16bit: bool = False) -> np.ndarray:
    """H x W x 3 as the DELIVER loader does: 1 channel repeated, 4 cut to 3; uint8, or
    with `keep_16bit` 16-bit files stay uint16 (as `torchvision.io.read_image` keeps them)."""
    if not (keep_16bit and arr.dtype == np.uint16):
        arr = to_uint8(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    channels = arr.shape[2]
    if channels == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif channels == 2:  # grey + alpha
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif channels >= 3:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize with torch's `nearest` rule (src = floor(dst * in / out)).

    This is what the official DELIVER loader applies to event images.
    """
    h_in, w_in = arr.shape[:2]
    if (h_in, w_in) == (height, width):
        return arr
    rows = np.arange(height) * h_in // height
    cols = np.arange(width) * w_in // width
    return np.ascontiguousarray(arr[rows][:, cols])
