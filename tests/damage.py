"""Damaged files of every kind the corrupt-file tests write, and the subprocess runs of
`pipeline` they check (`pipelines`: several commands in one process): each damage as a
function of the intact file's bytes."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + \
        struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def overwrite_idat(data: bytes) -> bytes:
    """Bytes 60-400 overwritten, all inside the first IDAT chunk (as bit rot leaves it)."""
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    assert idat + 4 <= 60 and 400 <= idat + 4 + length, "the damage must fall inside IDAT"
    noise = np.random.default_rng(0).integers(0, 256, 340, dtype=np.uint8).tobytes()
    return data[:60] + noise + data[400:]


def bad_crc(data: bytes) -> bytes:
    """The first IDAT's CRC flipped, its data intact (PIL alone would decode this)."""
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    at = idat + 4 + length
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def jpeg(_: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb(_: bytes) -> bytes:
    """A valid header declaring 100000 x 100000 RGB pixels over a tiny stream."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + \
        _chunk(b"IDAT", zlib.compress(b"\0" * 300_001)) + _chunk(b"IEND", b"")


def label_16bit(_: bytes) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ones((24, 32), np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def scramble_idat(data: bytes) -> bytes:
    """The first IDAT's deflate stream (after its 2-byte zlib header) overwritten with
    noise and the chunk's CRC made to match: only the compressed stream is damaged."""
    idat = data.find(b"IDAT")
    length = struct.unpack(">I", data[idat - 4:idat])[0]
    start, end = idat + 6, idat + 4 + length
    noise = np.random.default_rng(1).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    body = data[idat + 4:start] + noise
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + body) & 0xFFFFFFFF)
    return data[:idat + 4] + body + crc + data[end + 4:]


def truncated(data: bytes) -> bytes:
    return data[:len(data) // 2]


def zero_bytes(_: bytes) -> bytes:
    return b""


# .npy damage (MCubeS AoLP / DoLP maps)
def npy_object_array(_: bytes) -> bytes:
    """A .npy whose array holds Python objects: loading it would unpickle them."""
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buf.getvalue()


def npy_pickle(_: bytes) -> bytes:
    """A plain pickle under a .npy name."""
    return pickle.dumps(np.zeros(3))


def npy_damaged_header(data: bytes) -> bytes:
    """The header's dict overwritten in its middle (bit rot in the first 128 bytes)."""
    return data[:20] + b"\x00garbage\xff" + data[31:]


def npy_bomb(data: bytes) -> bytes:
    """A valid header declaring 100000 x 100000 float32 over 64 bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }"
    header = header.ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + \
        bytes(64)


def _env() -> dict[str, str]:
    """One torch thread (tests/conftest.py `one_thread`): what the commands compute is not
    what is tested, and two threads per process oversubscribe make test's two cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def pipeline(*args, cwd):
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)


# One process runs several `pipeline` commands in turn, each as `python -m pipeline` would
# (`main` and its exit status; an uncaught exception's traceback and status 1), with file
# descriptors 1 and 2 pointed at the command's own files, so that what it printed -
# loader workers and native libraries included - is told apart from the others'.
_DRIVER = """
import json, os, sys, traceback
commands, outdir = json.loads(sys.argv[1]), sys.argv[2]
from pipeline.cli import main
for i, args in enumerate(commands):
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for fd, kind in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(outdir, f"{i}.{kind}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        if isinstance(exc.code, int) or exc.code is None:
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(saved[0]); os.close(saved[1])
    with open(os.path.join(outdir, f"{i}.code"), "w") as f:
        f.write(str(code))
"""


def pipelines(*commands, cwd, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """`pipeline(*args)` for each of `commands` in turn, all in one subprocess (one start-up
    of Python, torch and the teacher's libraries instead of one per command). A native
    crash still fails the caller, not the test run: the command it hit (and every later
    one) gets the process's status (-11 for SIGSEGV) and what it had printed."""
    argv = [[str(a) for a in args] for args in commands]
    with tempfile.TemporaryDirectory(prefix="pipelines-") as tmp:
        outdir = Path(tmp)
        proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(argv), tmp], cwd=cwd,
                              env=_env(), capture_output=True, text=True, timeout=timeout)

        def text(i: int, kind: str) -> str:
            path = outdir / f"{i}.{kind}"
            return path.read_text(errors="replace") if path.exists() else ""

        return [subprocess.CompletedProcess(
            args, int(text(i, "code")) if text(i, "code") else proc.returncode or -1,
            text(i, "out"), text(i, "err") + ("" if text(i, "code") else proc.stderr))
            for i, args in enumerate(argv)]


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one error line a failed command printed: exit status 1 (not a signal), no
    traceback, exactly one `error:` line on stderr."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]
