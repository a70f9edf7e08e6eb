"""Decoding of dataset image files into arrays, with errors that name the file.

Every reader goes through here so that a corrupt PNG, a truncated file or an
unexpected channel count produces the same one-line `DatasetError`, never a crash of
the process: libpng (imagecodecs' build) decodes the kinds where it returns what PIL
returns, PIL the rest, and either one's refusal of damaged bytes becomes that error
(`benchmarks/decode.py` tries every candidate decoder on damaged files, each in its own
process). A path may be a file inside a packed data set (`PackedPath`): its original
bytes decode the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, UnidentifiedImageError

from any2seg.datasets.packed import PackedPath, open_binary
from any2seg.errors import DatasetError

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (bit depth, colour type) that libpng returns exactly as PIL does: 8-bit grey, RGB,
# grey + alpha, RGBA and 16-bit grey (PIL: I;16). Palette, 1/2/4-bit and 16-bit colour
# images, interlaced files and any file with a tRNS chunk keep PIL's conversions.
_LIBPNG_SAME = {(8, 0), (8, 2), (8, 4), (8, 6), (16, 0)}
# Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS, past which PIL itself
# refuses a file), for every file; a header declaring more is refused before allocating
_MAX_PIXELS = 2 * 89_478_485
# what a file that is not a PNG most likely is, by its first bytes
_OTHER_FORMATS = {b"\xff\xd8\xff": "a JPEG", b"GIF8": "a GIF", b"II*\x00": "a TIFF",
                  b"MM\x00*": "a TIFF", b"RIFF": "a RIFF (WebP) file", b"BM": "a BMP",
                  b"\x93NUMPY": "a .npy array", b"<": "text (HTML or XML)"}
_LIBPNG_ERRORS = (imagecodecs.PngError, RuntimeError, ValueError, MemoryError)
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


def _undecodable(path: Path | PackedPath, why: str) -> DatasetError:
    return DatasetError(f"cannot decode {path} ({why}); the file is corrupt or truncated: "
                        "re-download or regenerate it, or pass --skip-bad to skip this sample")


def _check_header(data: bytes, path: Path | PackedPath) -> None:
    """Refuse what no decoder should see: an empty file, another format under a PNG name,
    a header cut short, or a declared size past the decompression-bomb limit."""
    if not data:
        raise _undecodable(path, "empty file")
    if not data.startswith(_PNG_SIGNATURE):
        kind = next((k for sig, k in _OTHER_FORMATS.items() if data.startswith(sig)),
                    "no known image format")
        raise _undecodable(path, f"not a PNG: its first bytes are those of {kind}")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _undecodable(path, "no PNG header (IHDR) after the signature")
    width, height = struct.unpack(">II", data[16:24])
    if width * height > _MAX_PIXELS:
        raise _undecodable(path, f"its header declares {width} x {height} pixels, more than "
                                 f"the {_MAX_PIXELS} a decoder is allowed (a decompression bomb "
                                 "or a damaged header)")


def _check_chunks(data: bytes, path: Path | PackedPath) -> None:
    """Every chunk's CRC up to IEND (PIL does not check IDAT's; libpng checks them all),
    so that damaged bytes in a file PIL decodes are refused too."""
    pos, end = 8, len(data)
    while True:
        if pos + 12 > end:
            raise _undecodable(path, "the file ends inside a chunk, before IEND")
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        body_end = pos + 8 + length
        if body_end + 4 > end:
            raise _undecodable(path, f"the file ends inside its {data[pos + 4:pos + 8]!r} "
                                     "chunk")
        crc = struct.unpack(">I", data[body_end:body_end + 4])[0]
        if zlib.crc32(memoryview(data)[pos + 4:body_end]) != crc:
            raise _undecodable(path, f"CRC error in its {data[pos + 4:pos + 8]!r} chunk at "
                                     f"byte {pos}")
        if data[pos + 4:pos + 8] == b"IEND":
            return
        pos = body_end + 4


def _libpng(data: bytes) -> np.ndarray | None:
    """libpng (`imagecodecs.png_decode`; the official DELIVER loader decodes with libpng
    too) where it returns the array PIL returns; None where PIL should decode (other
    kinds). Raises libpng's error (imagecodecs.PngError, or MemoryError) on damaged data:
    it refuses every damage `benchmarks/decode.py` tries, a bad CRC included."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR" or \
            (data[24], data[25]) not in _LIBPNG_SAME or data[28] != 0:
        return None
    idat = data.find(b"IDAT")
    if idat < 0 or b"tRNS" in data[:idat]:
        return None
    return imagecodecs.png_decode(data)


def read_png(path: Path | PackedPath, digest: list[str] | None = None) -> np.ndarray:
    """Decode an image file exactly as stored: H x W (grey) or H x W x C, uint8 or uint16.

    With `digest` (a list), the sha256 of the bytes just read is appended to it: the
    content hash of `any2seg.content` from the same read as the decoding."""
    path = path if isinstance(path, PackedPath) else Path(path)
    if not path.is_file():
        raise DatasetError(f"missing file {path}")
    data = _read(path, digest)
    _check_header(data, path)
    try:
        fast = _libpng(data)
    except _LIBPNG_ERRORS as exc:
        raise _undecodable(path, f"libpng: {str(exc).strip() or type(exc).__name__}") from exc
    if fast is not None:
        return fast
    _check_chunks(data, path)
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise _undecodable(path, str(exc) or type(exc).__name__) from exc


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
