"""Writing the generated sample: what to generate (`SampleSpec`), the scene plan, each
frame's files in the DELIVER layout, and `make_sample`, which publishes the folder whole.

Scenes render in parallel (spawned worker processes) into a temporary sibling folder that
is renamed into place at the end, so an interrupted run never leaves a half-written sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from any2seg.deliver_taxonomy import CASES, CLASSES, CONDITIONS
from any2seg.diskspace import remove_stale_temps, temp_path
from any2seg.errors import PipelineError
from any2seg.publish import publish
from any2seg.synth.appearance import albedo, apply_weather
from any2seg.synth.render import render
from any2seg.synth.scene import make_scene
from any2seg.synth.sensors import camera, depth_mm, events, hha, lidar, semantic

GENERATOR = "any2seg-pipeline deliver-sample v1"
MANIFEST = "sample.json"
_FOLDERS = ("img", "hha", "depth", "event", "lidar", "semantic")

# what can be generated in reasonable time and memory: DELIVER's own frames are 1042 px
MAX_SIZE = 4096
MAX_FRAMES = 100_000


@dataclass(frozen=True)
class SampleSpec:
    """What to generate; also recorded in `sample.json` to recognise an existing sample."""

    size: int = 256
    train: int = 120
    val: int = 40
    test: int = 40
    frames_per_scene: int = 4
    seed: int = 0

    def validate(self) -> None:
        if self.size < 64 or self.size % 2 or self.size > MAX_SIZE:
            raise PipelineError(f"--size must be an even number in [64, {MAX_SIZE}], got "
                                f"{self.size}")
        for split in ("train", "val", "test"):
            if not 0 <= getattr(self, split) <= MAX_FRAMES:
                raise PipelineError(f"--{split} must be in [0, {MAX_FRAMES}], got "
                                    f"{getattr(self, split)}")
        if self.train + self.val + self.test == 0:
            raise PipelineError("nothing to generate: --train, --val and --test are all 0")
        if not 1 <= self.frames_per_scene <= MAX_FRAMES:
            raise PipelineError(f"--frames-per-scene must be in [1, {MAX_FRAMES}], got "
                                f"{self.frames_per_scene}")

def _plan(spec: SampleSpec) -> list[tuple[str, int, str, str | None, int]]:
    """(split, scene index, condition, case, frames) for every scene, in a fixed order."""
    plan = []
    cases: list[str | None] = [None, *CASES]
    for split in ("train", "val", "test"):
        n = getattr(spec, split)
        n_scenes = math.ceil(n / spec.frames_per_scene)
        for i in range(n_scenes):
            frames = min(spec.frames_per_scene, n - i * spec.frames_per_scene)
            plan.append((split, i, CONDITIONS[i % len(CONDITIONS)], cases[i % len(cases)],
                         frames))
    return plan


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="PNG", compress_level=6)


def _write_scene(root: Path, spec: SampleSpec, split: str, index: int, condition: str,
                 case: str | None, n_frames: int) -> np.ndarray:
    """Render and write every frame of one scene; returns its class pixel histogram."""
    split_id = ("train", "val", "test").index(split)
    rng = np.random.default_rng([spec.seed, split_id, index])
    scene = make_scene(rng, condition, case, n_frames)
    name = f"MAP_{1 + index % 10}_point{index}" + (f"_{case}" if case else "")
    first = int(rng.integers(1, 900)) * 50
    size = spec.size
    hist = np.zeros(len(CLASSES), dtype=np.int64)

    prev = render(scene, 0, size)
    prev_rad = apply_weather(scene, *albedo(scene, prev), prev.z)
    for k in range(n_frames):
        fr = render(scene, k + 1, size)
        rad = apply_weather(scene, *albedo(scene, fr), fr.z)
        frame = f"{first + 10 * k:06d}"
        rel = Path(condition) / split / name
        _save(root / "img" / rel / f"{frame}_rgb_front.png", camera(scene, rad, rng))
        _save(root / "hha" / rel / f"{frame}_depth_front.png", hha(fr, scene))
        _save(root / "depth" / rel / f"{frame}_depth_front.png", depth_mm(fr))
        _save(root / "event" / rel / f"{frame}_event_front.png",
              events(prev_rad, rad, scene, rng))
        _save(root / "lidar" / rel / f"{frame}_lidar_front.png", lidar(scene, fr.z, rng))
        _save(root / "semantic" / rel / f"{frame}_semantic_front.png", semantic(fr))
        hist += np.bincount(fr.cls.ravel(), minlength=len(CLASSES))
        prev, prev_rad = fr, rad
    return hist


def _work(args: tuple[str, SampleSpec, str, int, str, str | None, int]) -> np.ndarray:
    root, spec, *rest = args
    return _write_scene(Path(root), spec, *rest)


def _manifest(spec: SampleSpec, hist: np.ndarray) -> dict[str, Any]:
    total = max(int(hist.sum()), 1)
    return {
        "generator": GENERATOR,
        "spec": asdict(spec),
        "class_pixel_fraction": {CLASSES[i]: round(int(hist[i]) / total, 5)
                                 for i in range(len(CLASSES)) if hist[i]},
    }


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def make_sample(out: Path | str, spec: SampleSpec = SampleSpec(), *, overwrite: bool = False,
                workers: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Generate the sample at `out` unless an identical one is already there.

    Returns the manifest plus `status` ("written" or "up-to-date") and `seconds`.
    Generation goes to a temporary sibling folder that is renamed into place at the
    end, so an interrupted run never leaves a half-written sample, and an existing
    folder is only replaced with `overwrite`.
    """
    spec.validate()
    if workers is not None and workers < 1:
        raise PipelineError(f"--workers must be >= 1 (1 renders in this process), got {workers}")
    out = Path(out)
    existing = read_manifest(out)
    if existing is not None and existing.get("generator") == GENERATOR and \
            existing.get("spec") == asdict(spec) and not overwrite:
        return {**existing, "status": "up-to-date", "seconds": 0.0}
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if existing is None:
            raise PipelineError(f"{out} exists and is not a generated sample; refusing to "
                                "write into it: choose another --out or remove it yourself")
        if not overwrite:
            raise PipelineError(f"{out} holds a sample generated with other settings "
                                f"({existing.get('spec')}); pass --overwrite to replace it "
                                "or choose another --out")
    start = time.perf_counter()
    remove_stale_temps(out)
    tmp = temp_path(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    plan = _plan(spec)
    jobs = [(str(tmp), spec, *p) for p in plan]
    hist = np.zeros(len(CLASSES), dtype=np.int64)
    try:
        workers = workers if workers is not None else min(len(jobs), os.cpu_count() or 1)
        if workers > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(workers) as pool:
                for i, h in enumerate(pool.imap(_work, jobs)):
                    hist += h
                    if progress:
                        progress(i + 1, len(jobs))
        else:
            for i, job in enumerate(jobs):
                hist += _work(job)
                if progress:
                    progress(i + 1, len(jobs))
        manifest = _manifest(spec, hist)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # only what we generate is replaced; `existing` proved `out` holds our sample
        publish(tmp, out, (*_FOLDERS, MANIFEST))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**manifest, "status": "written", "seconds": round(time.perf_counter() - start, 2)}
