"""PNG decoders side by side on the readers' real inputs: what each does with a damaged
file (in a subprocess, so a crash is a result, not the end of the run), whether it returns
what the readers return, and how fast it is per DELIVER-size sample.

    python benchmarks/decode.py [--frames 4] [--repeats 7] [--size 1042] [--root DIR]
                                [--skip-safety] [--out benchmarks/results/decode.json]

Candidates (each bytes -> the array the readers return, H x W or H x W x C, channels in
RGB order): Pillow, pyspng (libspng), OpenCV headless (`cv2.imdecode`, BGR turned to RGB),
imagecodecs (its libpng and libspng codecs), torchvision (`io.decode_png`, libpng) and
the project's `read_png` (which reads the file and applies the readers' conversions).
A candidate that is not installed is reported as such; this is the one file in the
project that calls the libraries directly (the project decodes only through
`any2seg.datasets.decode.read_png`).

Inputs: `--frames` frames of `pipeline make-sample --size 1042` (or `--root`, a
DELIVER-layout folder), plus the kinds the readers meet that the generator does not write,
made from the same frames: the event image as RGBA (DELIVER's event PNGs have 4
channels), the label as a palette and as a 1-channel PNG (MCubeS-style), the raw 16-bit
depth. One DELIVER sample is rgb + hha depth + event (RGBA) + lidar + label (RGB).

- safety: per candidate and damage (bytes 60-400 overwritten inside the IDAT of each kind;
  a truncated file; a bad IDAT CRC with intact data; zero bytes; a JPEG under .png; a
  header declaring 200000 x 200000 px over a small stream): `raised` (the exception's
  type), `accepted` (returned an array: silently decoded damage), `signal N` or
  `timeout`; each in its own process, address space capped at 8 GiB.
- equality: per kind, is the candidate's array equal (dtype, shape, values) to today's
  `read_png`, in every frame.
- speed: ms per file of each kind and per DELIVER sample, bytes already in memory, every
  candidate once per repeat in turn (interleaved), median and min-max over the repeats;
  one thread (torch.set_num_threads(1), OpenCV's setNumThreads(1)). Both the thread's CPU
  time (`time.thread_time`: what decoding costs, nearly independent of what else the
  shared machine runs) and the elapsed time are recorded.

Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_KINDS = ("rgb", "hha", "event_rgba", "lidar", "label_rgb")
EXTRA_KINDS = ("depth16", "label_palette", "label_grey")
PROBE_LIMIT = 8 << 30  # address space of a safety probe


# -- candidates: bytes -> the readers' array -------------------------------------------
def _pil(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return np.asarray(img)


def _pyspng(data: bytes) -> np.ndarray:
    import pyspng

    return pyspng.load(data)


def _opencv(data: bytes) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("cv2.imdecode returned None")
    if arr.ndim == 3 and arr.shape[2] == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if arr.ndim == 3 and arr.shape[2] == 4:
        return cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    return arr


def _imagecodecs_png(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.png_decode(data)


def _imagecodecs_spng(data: bytes) -> np.ndarray:
    import imagecodecs

    return imagecodecs.spng_decode(data)


def _torchvision(data: bytes) -> np.ndarray:
    import torch
    from torchvision.io import ImageReadMode, decode_png

    arr = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                     ImageReadMode.UNCHANGED).permute(1, 2, 0).numpy()
    return arr[:, :, 0] if arr.shape[2] == 1 else arr


CANDIDATES: dict[str, tuple[str, Callable[[bytes], np.ndarray]]] = {
    # name: (module that must import, decoder)
    "pillow": ("PIL", _pil),
    "pyspng": ("pyspng", _pyspng),
    "opencv": ("cv2", _opencv),
    "imagecodecs-png": ("imagecodecs", _imagecodecs_png),
    "imagecodecs-spng": ("imagecodecs", _imagecodecs_spng),
    "torchvision": ("torchvision", _torchvision),
}


def available() -> dict[str, str]:
    """{candidate: version or 'not installed'}."""
    import importlib

    out = {}
    for name, (module, _) in CANDIDATES.items():
        try:
            mod = importlib.import_module(module)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            out[name] = "not installed"
    return out


# -- inputs ------------------------------------------------------------------------------
def sample_files(root: Path, frames: int, tmp: Path) -> dict[str, list[Path]]:
    """{kind: one file per frame} from a DELIVER-layout root."""
    from PIL import Image

    from any2seg import datasets
    from any2seg.deliver_taxonomy import PALETTE

    records = datasets.get("deliver").index(root, "train")[:frames]
    raw = datasets.get("deliver").index(root, "train", modalities=["depth"],
                                        depth_source="raw")[:frames]
    kinds: dict[str, list[Path]] = {k: [] for k in (*SAMPLE_KINDS, *EXTRA_KINDS)}
    palette = np.zeros((256, 3), np.uint8)
    palette[1:26] = PALETTE
    for i, (r, d) in enumerate(zip(records, raw, strict=True)):
        kinds["rgb"].append(r.files["rgb"])
        kinds["hha"].append(r.files["depth"])
        kinds["lidar"].append(r.files["lidar"])
        kinds["label_rgb"].append(r.files["label"])
        kinds["depth16"].append(d.files["depth"])
        with Image.open(r.files["event"]) as ev:
            rgba = ev.convert("RGBA")
        kinds["event_rgba"].append(_save(rgba, tmp / f"event_rgba_{i}.png"))
        with Image.open(r.files["label"]) as lab:
            red = np.asarray(lab)[:, :, 0]
        grey = Image.fromarray(red)
        kinds["label_grey"].append(_save(grey, tmp / f"label_grey_{i}.png"))
        pal = Image.frombytes("P", (red.shape[1], red.shape[0]), red.tobytes())
        pal.putpalette(palette.tobytes())
        kinds["label_palette"].append(_save(pal, tmp / f"label_palette_{i}.png"))
    return kinds


def _save(img: Any, path: Path) -> Path:
    img.save(path, format="PNG", compress_level=6)
    return path


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(
        ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def damaged(kinds: dict[str, list[Path]], tmp: Path) -> dict[str, Path]:
    """{damage: file}: the damage kinds of the issue, made from the first frame's files."""
    out: dict[str, Path] = {}
    rng = np.random.default_rng(0)
    for kind in ("rgb", "depth16", "event_rgba", "label_palette"):
        data = bytearray(kinds[kind][0].read_bytes())
        idat = data.find(b"IDAT")
        length = struct.unpack(">I", data[idat - 4:idat])[0]
        if not idat + 4 <= 60 < 400 <= idat + 4 + length:  # a small file: not this damage
            continue
        data[60:400] = rng.integers(0, 256, 340, dtype=np.uint8).tobytes()
        out[f"idat_overwritten_{kind}"] = _write(tmp / f"idat_{kind}.png", bytes(data))
    data = kinds["rgb"][0].read_bytes()
    out["truncated"] = _write(tmp / "truncated.png", data[:len(data) // 2])
    bad = bytearray(data)
    idat = bad.find(b"IDAT")
    length = struct.unpack(">I", bad[idat - 4:idat])[0]
    bad[idat + 4 + length] ^= 0xFF  # first byte of that chunk's CRC; the data are intact
    out["bad_crc"] = _write(tmp / "bad_crc.png", bytes(bad))
    out["zero_bytes"] = _write(tmp / "zero.png", b"")
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="JPEG")
    out["jpeg_named_png"] = _write(tmp / "jpeg.png", buf.getvalue())
    ihdr = struct.pack(">IIBBBBB", 200_000, 200_000, 8, 2, 0, 0, 0)
    stream = zlib.compress(b"\0" * (1 + 3 * 200_000) * 4)
    out["bomb_header"] = _write(tmp / "bomb.png", b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
                                + _chunk(b"IDAT", stream) + _chunk(b"IEND", b""))
    return out


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- safety: one process per candidate and file ------------------------------------------
def probe(name: str, path: Path) -> None:
    """Runs in the child: decode `path` with `name` and print one line."""
    if name == "read_png":
        from any2seg.datasets.decode import read_png

        fn: Callable[[Any], np.ndarray] = read_png
        arg: Any = path
    else:
        fn, arg = CANDIDATES[name][1], path.read_bytes()
    try:
        arr = fn(arg)
    except BaseException as exc:  # noqa: BLE001 - every outcome is the result
        msg = str(exc).splitlines()[0][:160] if str(exc) else ""
        print(f"raised {type(exc).__name__}: {msg}")
        return
    print(f"accepted {arr.dtype} {tuple(arr.shape)}")


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (PROBE_LIMIT, PROBE_LIMIT))


def safety(names: list[str], files: dict[str, Path]) -> dict[str, dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    table: dict[str, dict[str, str]] = {}
    for name in names:
        table[name] = {}
        for damage, path in files.items():
            try:
                r = subprocess.run([sys.executable, __file__, "--probe", name, str(path)],
                                   capture_output=True, text=True, timeout=120, env=env,
                                   preexec_fn=_limit)
            except subprocess.TimeoutExpired:
                table[name][damage] = "timeout"
                continue
            if r.returncode < 0:
                table[name][damage] = f"signal {-r.returncode}"
            elif r.returncode != 0:
                last = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
                table[name][damage] = f"exit {r.returncode}: {last}"
            else:
                table[name][damage] = r.stdout.strip().splitlines()[-1]
    return table


# -- equality and speed ------------------------------------------------------------------
def equality(names: list[str], kinds: dict[str, list[Path]]) -> dict[str, dict[str, str]]:
    """Per candidate and kind: 'equal' when every frame's array is today's `read_png`'s."""
    from any2seg.datasets.decode import read_png

    table: dict[str, dict[str, str]] = {}
    for name in names:
        fn = CANDIDATES[name][1]
        table[name] = {}
        for kind, paths in kinds.items():
            verdict = "equal"
            for p in paths:
                want = read_png(p)
                try:
                    got = fn(p.read_bytes())
                except Exception as exc:  # noqa: BLE001
                    verdict = f"raised {type(exc).__name__}"
                    break
                if got.dtype != want.dtype or got.shape != want.shape:
                    verdict = f"{got.dtype} {got.shape[2:] or '2-D'} (readers: {want.dtype} " \
                              f"{want.shape[2:] or '2-D'})"
                    break
                if not np.array_equal(got, want):
                    verdict = "values differ"
                    break
            table[name][kind] = verdict
    return table


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def speed(names: list[str], kinds: dict[str, list[Path]], repeats: int
          ) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """ms per file of each kind, every candidate once per repeat in turn; {"cpu": this
    thread's CPU time (what the decoder costs, whatever else the machine runs), "wall":
    elapsed time} -> candidate -> kind -> median and min-max."""
    from any2seg.datasets.decode import read_png

    blobs = {k: [p.read_bytes() for p in ps] for k, ps in kinds.items()}
    fns: dict[str, Callable[[], None]] = {}
    for name in names:
        fn = CANDIDATES[name][1]
        for kind in kinds:
            fns[f"{name}|{kind}"] = (lambda f=fn, bs=blobs[kind]: [f(b) for b in bs])
    for kind, paths in kinds.items():
        fns[f"read_png|{kind}"] = (lambda ps=paths: [read_png(p) for p in ps])
    for f in fns.values():  # warm-up: imports, page cache
        try:
            f()
        except Exception:  # noqa: BLE001 - a kind a candidate refuses is timed anyway
            pass
    clocks = {"cpu": time.thread_time, "wall": time.perf_counter}
    times: dict[str, dict[str, list[float]]] = {c: {k: [] for k in fns} for c in clocks}
    for _ in range(repeats):
        for key, f in fns.items():
            n = len(kinds[key.split("|")[1]])
            start = {c: clock() for c, clock in clocks.items()}
            try:
                f()
                failed = False
            except Exception:  # noqa: BLE001
                failed = True
            for c, clock in clocks.items():
                times[c][key].append(float("nan") if failed else
                                     (clock() - start[c]) * 1e3 / n)
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for c, per_key in times.items():
        table = out.setdefault(c, {})
        for key, t in per_key.items():
            name, kind = key.split("|")
            table.setdefault(name, {})[kind] = spread(t)
        for name, per_kind in table.items():  # one DELIVER sample: its files, per repeat
            per_repeat = [sum(per_key[f"{name}|{k}"][i] for k in SAMPLE_KINDS)
                          for i in range(repeats)]
            per_kind["sample"] = spread(per_repeat)
    return out


def fmt(s: dict[str, float]) -> str:
    if s["median"] != s["median"]:
        return "fails"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def report(result: dict[str, Any]) -> None:
    print(f"{result['frames']} frames of {result['size']} px, {result['repeats']} interleaved "
          f"repeats, 1 thread, load {result['load_before']:.1f} -> {result['load_after']:.1f}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    cols = ["sample", *SAMPLE_KINDS, *EXTRA_KINDS]
    for clock, sp in result["speed"].items():
        print(f"\n{clock} ms per file (per DELIVER sample in the first column), median "
              "(min-max)")
        print("| decoder | " + " | ".join(cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for name, per_kind in sp.items():
            print(f"| {name} | " + " | ".join(fmt(per_kind[c]) for c in cols) + " |")
    eq = result["equality"]
    kinds = [*SAMPLE_KINDS, *EXTRA_KINDS]
    print("\nequal to today's read_png")
    print("| decoder | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for name, per_kind in eq.items():
        print(f"| {name} | " + " | ".join(per_kind[k] for k in kinds) + " |")
    if result.get("safety"):
        damages = list(next(iter(result["safety"].values())))
        print("\ndamaged files, each decoded in its own process")
        print("| decoder | " + " | ".join(damages) + " |")
        print("|---|" + "---|" * len(damages))
        for name, per in result["safety"].items():
            print(f"| {name} | " + " | ".join(per[d].split(":")[0] for d in damages) + " |")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--probe":
        probe(sys.argv[2], Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="a DELIVER-layout folder (default: generate)")
    parser.add_argument("--size", type=int, default=1042)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-safety", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/decode.json")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    versions = available()
    names = [n for n, v in versions.items() if v != "not installed"]
    result: dict[str, Any] = {"benchmark": "decode", "size": args.size, "repeats": args.repeats,
                              "cpu_count": os.cpu_count(), "machine": platform.machine(),
                              "load_before": os.getloadavg()[0], "versions": versions}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = args.root
        if root is None:
            from any2seg.synth import SampleSpec, make_sample

            root = tmp / "sample"
            make_sample(root, SampleSpec(size=args.size, train=args.frames, val=0, test=0))
        kinds = sample_files(root, args.frames, tmp)
        result["frames"] = len(kinds["rgb"])
        if not args.skip_safety:
            result["safety"] = safety([*names, "read_png"], damaged(kinds, tmp))
        result["equality"] = equality(names, kinds)
        result["speed"] = speed(names, kinds, args.repeats)
    result["load_after"] = os.getloadavg()[0]
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
