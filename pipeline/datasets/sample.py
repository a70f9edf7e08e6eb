"""Generated DELIVER-format street scenes: the embedded default data set.

Real DELIVER cannot be fetched on an offline machine, so `pipeline make-sample`
renders small procedural drives in the exact DELIVER on-disk layout. Each scene is
a road with sidewalks, building facades, trees, poles, vehicles and pedestrians,
rendered by a pinhole camera moving forward one step per frame, so that:

- RGB carries class-dependent colour and texture (what names a class);
- depth (`depth/`, uint16 mm) and HHA (`hha/`) carry geometry (ground vs upright);
- LiDAR carries sparse range scan lines (robust in the dark, short range in fog);
- events carry moving edges from the frame-to-frame motion (robust at night).

Weather degrades RGB (night: dark and noisy; fog: contrast falls with depth; rain:
streaks; cloud: flat light) and the five sensor failures act on the sensor they name.
Everything is drawn from `numpy.random.default_rng([seed, split, scene])`, so a
seed gives the same bytes on every machine.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.datasets.deliver import CASES, CLASSES, CONDITIONS, DeliverReader
from pipeline.datasets.registry import register
from pipeline.errors import PipelineError
from pipeline.publish import publish

GENERATOR = "any2seg-pipeline deliver-sample v1"
MANIFEST = "sample.json"
_FOLDERS = ("img", "hha", "depth", "event", "lidar", "semantic")
_C = {name: i for i, name in enumerate(CLASSES)}
_FAR = np.float32(1e4)  # "infinite" depth for the sky


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


# ---------------------------------------------------------------------------------------
# scene description (world coordinates: X right, Y up from the ground, Z forward)
# ---------------------------------------------------------------------------------------
@dataclass
class Board:
    """An upright, camera-facing shape: vehicles, people, trees, poles, signs."""

    cls: int
    inst: int
    x: float
    z: float
    width: float
    height: float
    y0: float = 0.0
    shape: str = "rect"
    speed: float = 0.0  # metres per frame along Z


@dataclass
class Segment:
    """A stretch of facade, wall or fence on a plane parallel to the road."""

    cls: int
    inst: int
    z0: float
    z1: float
    height: float


@dataclass
class Scene:
    condition: str
    case: str | None
    road_half: float
    sidewalk: float
    cam_height: float
    horizon: float  # as a fraction of the image height
    focal: float  # as a fraction of the image width
    ground_cls: tuple[int, int]
    facade_x: tuple[float, float]
    segments: tuple[list[Segment], list[Segment]]
    boards: list[Board]
    tints: np.ndarray  # (n_inst, 3) colour per instance
    lit: np.ndarray  # (n_inst,) emissive at night
    fog_beta: float
    step: float = 1.2
    dash: float = 3.0
    extras: dict[str, Any] = field(default_factory=dict)


def _vehicle_spec(rng: np.random.Generator) -> tuple[int, float, float, str]:
    r = rng.random()
    if r < 0.55:
        return _C["Cars"], rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.6), "car"
    if r < 0.7:
        return _C["Truck"], rng.uniform(2.4, 2.6), rng.uniform(3.0, 3.6), "truck"
    if r < 0.82:
        return _C["Bus"], rng.uniform(2.5, 2.7), rng.uniform(2.9, 3.2), "bus"
    return _C["TwoWheeler"], rng.uniform(0.7, 0.9), rng.uniform(1.4, 1.7), "bike"


def make_scene(rng: np.random.Generator, condition: str, case: str | None,
               n_frames: int) -> Scene:
    """Draw one street: layout, objects and colours, long enough for `n_frames` steps."""
    tints: list[tuple[float, float, float]] = [(0.0, 0.0, 0.0)]
    lit: list[bool] = [False]

    def new_inst(tint: tuple[float, float, float], emissive: bool = False) -> int:
        tints.append(tint)
        lit.append(emissive)
        return len(tints) - 1

    road_half = rng.uniform(3.2, 5.5)
    sidewalk = rng.uniform(1.6, 3.0)
    step = 1.2
    z_end = 140.0 + step * n_frames
    facade_colours = [(150, 80, 60), (190, 170, 130), (120, 120, 125), (95, 105, 130),
                      (170, 140, 110), (200, 195, 185)]
    segments: tuple[list[Segment], list[Segment]] = ([], [])
    facade_x = []
    ground = []
    boards: list[Board] = []
    for side in (0, 1):
        sign = -1.0 if side == 0 else 1.0
        kind = rng.choice(["buildings", "buildings", "green", "fenced"])
        setback = rng.uniform(0.3, 3.0)
        x_plane = sign * (road_half + sidewalk + setback)
        facade_x.append(x_plane)
        ground.append(_C["Terrain"] if kind == "green" else _C["Ground"])
        z = rng.uniform(-2.0, 4.0)
        while z < z_end:
            length = rng.uniform(8.0, 24.0)
            if kind == "buildings":
                if rng.random() < 0.8:
                    c = facade_colours[rng.integers(len(facade_colours))]
                    seg = Segment(_C["Building"], new_inst(tuple(c)), z, z + length,
                                  rng.uniform(7.0, 26.0))
                else:
                    seg = Segment(_C["Wall"], new_inst((135, 130, 140)), z, z + length,
                                  rng.uniform(2.0, 3.5))
                segments[side].append(seg)
                z += length + (rng.uniform(0.0, 6.0) if rng.random() < 0.4 else 0.0)
            elif kind == "fenced":
                segments[side].append(Segment(_C["Fence"], new_inst((125, 95, 70)), z,
                                              z + length, rng.uniform(1.1, 1.6)))
                z += length + rng.uniform(0.0, 3.0)
            else:
                z += length
            if kind != "buildings" or rng.random() < 0.3:
                # trees behind the sidewalk
                tz = z - rng.uniform(0.0, length)
                tx = sign * (road_half + sidewalk + setback * rng.uniform(0.2, 0.9) + 0.5)
                trunk_h = rng.uniform(1.8, 3.2)
                crown = rng.uniform(2.5, 5.0)
                boards.append(Board(_C["Vegetation"], new_inst((90, 70, 50)), tx, tz,
                                    0.35, trunk_h))
                g = (rng.uniform(40, 80), rng.uniform(100, 140), rng.uniform(30, 60))
                boards.append(Board(_C["Vegetation"], new_inst(g), tx, tz - 0.05, crown,
                                    crown * rng.uniform(0.9, 1.3), y0=trunk_h * 0.8,
                                    shape="ellipse"))
        # poles with signs or traffic lights at the kerb
        z = rng.uniform(5.0, 20.0)
        while z < z_end:
            px = sign * (road_half + 0.4)
            ph = rng.uniform(3.2, 5.0)
            boards.append(Board(_C["Pole"], new_inst((150, 150, 155)), px, z, 0.18, ph))
            if rng.random() < 0.55:
                colour = (200, 30, 30) if rng.random() < 0.5 else (30, 70, 200)
                boards.append(Board(_C["TrafficSign"], new_inst(colour), px, z - 0.05, 0.8,
                                    0.8, y0=ph - 0.9, shape="ellipse" if rng.random() < 0.5
                                    else "rect"))
            else:
                boards.append(Board(_C["TrafficLight"], new_inst((35, 35, 35), emissive=True),
                                    px - sign * 0.3, z - 0.05, 0.45, 1.1, y0=ph - 1.1,
                                    shape="light"))
            z += rng.uniform(14.0, 30.0)
        # pedestrians and street furniture on the sidewalk
        for _ in range(rng.integers(1, 5)):
            pz = rng.uniform(4.0, 60.0)
            px = sign * (road_half + sidewalk * rng.uniform(0.2, 0.9))
            clothes = tuple(rng.integers(20, 230, size=3).tolist())
            boards.append(Board(_C["Pedestrian"], new_inst(clothes), px, pz,
                                rng.uniform(0.5, 0.7), rng.uniform(1.6, 1.9), shape="person",
                                speed=rng.uniform(-0.3, 0.3)))
        for _ in range(rng.integers(0, 3)):
            boards.append(Board(_C["Static"], new_inst((100, 120, 110)),
                                sign * (road_half + sidewalk * rng.uniform(0.5, 0.95)),
                                rng.uniform(5.0, 70.0), rng.uniform(0.6, 1.2),
                                rng.uniform(0.7, 1.2)))
    # traffic in both lanes
    for _ in range(rng.integers(2, 7)):
        cls, w, h, shape = _vehicle_spec(rng)
        lane = -1.0 if rng.random() < 0.5 else 1.0
        colour = tuple(rng.integers(20, 235, size=3).tolist())
        if cls == _C["Bus"]:
            colour = (220, 180, 30) if rng.random() < 0.5 else (190, 40, 40)
        if cls == _C["Truck"]:
            colour = (215, 215, 210)
        speed = rng.uniform(0.5, 2.0) if lane > 0 else rng.uniform(-2.0, -0.5)
        boards.append(Board(cls, new_inst(colour, emissive=True),
                            lane * road_half * rng.uniform(0.35, 0.65), rng.uniform(7.0, 70.0),
                            w, h, shape=shape, speed=speed))
    extras: dict[str, Any] = {}
    if rng.random() < 0.3:
        extras["bridge"] = (new_inst((150, 140, 130)), rng.uniform(35.0, 80.0),
                            rng.uniform(5.0, 6.0), rng.uniform(1.2, 2.0))
    return Scene(
        condition=condition, case=case, road_half=road_half, sidewalk=sidewalk,
        cam_height=rng.uniform(1.5, 1.9), horizon=rng.uniform(0.40, 0.48),
        focal=rng.uniform(0.75, 0.95), ground_cls=(ground[0], ground[1]),
        facade_x=(facade_x[0], facade_x[1]), segments=segments, boards=boards,
        tints=np.asarray(tints, dtype=np.float32), lit=np.asarray(lit),
        fog_beta=rng.uniform(0.035, 0.07), step=step, dash=rng.uniform(2.5, 4.0),
        extras=extras,
    )


# ---------------------------------------------------------------------------------------
# rendering: z-buffered ground plane, facade planes and camera-facing boards
# ---------------------------------------------------------------------------------------
@dataclass
class Frame:
    """Per-pixel geometry and surface parameters of one rendered view."""

    z: np.ndarray  # depth along the optical axis (m), _FAR for sky
    cls: np.ndarray  # class index, uint8
    inst: np.ndarray  # instance id, int32 (0 for stuff)
    tu: np.ndarray  # texture coordinates in metres
    tv: np.ndarray
    shade: np.ndarray  # Lambert-ish factor
    upright: np.ndarray  # True where the surface is vertical (for HHA)


def _hash(a: np.ndarray, b: np.ndarray, salt: int = 0) -> np.ndarray:
    """Deterministic value noise in [0, 1) from integer lattice coordinates."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return ((h & 0xFFFF).astype(np.float32)) / 65536.0


def render(scene: Scene, t: int, size: int) -> Frame:
    """Rasterise the scene as seen after `t` forward steps of the ego vehicle."""
    H = W = size
    f = scene.focal * W
    cx, yh = W / 2.0, scene.horizon * H
    hc = scene.cam_height
    ego = t * scene.step
    u = np.arange(W, dtype=np.float32) + 0.5
    v = np.arange(H, dtype=np.float32) + 0.5

    z = np.full((H, W), _FAR, dtype=np.float32)
    cls = np.full((H, W), _C["Sky"], dtype=np.uint8)
    inst = np.zeros((H, W), dtype=np.int32)
    tu = np.zeros((H, W), dtype=np.float32)
    tv = np.zeros((H, W), dtype=np.float32)
    shade = np.ones((H, W), dtype=np.float32)
    upright = np.zeros((H, W), dtype=bool)

    # ground plane below the horizon
    rows = v > yh + 0.5
    zg = np.minimum(f * hc / (v[rows] - yh), 400.0)[:, None]  # (R, 1)
    xg = (u[None, :] - cx) * zg / f  # (R, W)
    zw = zg + ego
    ax = np.abs(xg)
    g_cls = np.where(xg < 0, scene.ground_cls[0], scene.ground_cls[1]).astype(np.uint8)
    g_cls = np.where(ax < scene.road_half + scene.sidewalk, _C["SideWalk"], g_cls)
    g_cls = np.where(ax < scene.road_half, _C["Road"], g_cls)
    line = (np.abs(ax - 0.0) < 0.12) & (np.mod(zw, 2 * scene.dash) < scene.dash)
    kerb_lines = np.abs(ax - (scene.road_half - 0.25)) < 0.08
    g_cls = np.where(line | kerb_lines, _C["RoadLine"], g_cls)
    z[rows] = np.broadcast_to(zg, xg.shape)
    cls[rows] = g_cls
    tu[rows] = xg
    tv[rows] = zw
    shade[rows] = 1.0

    # facade planes (buildings, walls, fences) on both sides
    for side, segs in enumerate(scene.segments):
        x_plane = scene.facade_x[side]
        du = u - cx
        valid = du * x_plane > 1.0
        zc = np.where(valid, f * x_plane / np.where(valid, du, 1.0), -1.0)
        for seg in segs:
            cols = np.nonzero(valid & (zc + ego >= seg.z0) & (zc + ego < seg.z1) & (zc > 0.3))[0]
            if cols.size == 0:
                continue
            zcol = zc[cols][None, :]
            y = hc + (yh - v[:, None]) * zcol / f
            m = (y >= 0.0) & (y <= seg.height) & (zcol < z[:, cols])
            if not m.any():
                continue
            sub = np.s_[:, cols]
            z[sub] = np.where(m, zcol, z[sub])
            cls[sub] = np.where(m, seg.cls, cls[sub])
            inst[sub] = np.where(m, seg.inst, inst[sub])
            tu[sub] = np.where(m, zcol + ego, tu[sub])
            tv[sub] = np.where(m, y, tv[sub])
            shade[sub] = np.where(m, 0.72 if side == 0 else 0.95, shade[sub])
            upright[sub] = upright[sub] | m

    # an overpass: a slab across the whole view at fixed distance
    if "bridge" in scene.extras:
        b_inst, b_z, b_y0, b_th = scene.extras["bridge"]
        zb = b_z - ego
        if zb > 1.0:
            top = int(np.clip(np.floor(yh - f * (b_y0 + b_th - hc) / zb), 0, H))
            bot = int(np.clip(np.ceil(yh - f * (b_y0 - hc) / zb), 0, H))
            if bot > top:
                sub = np.s_[top:bot, :]
                m = zb < z[sub]
                z[sub] = np.where(m, zb, z[sub])
                cls[sub] = np.where(m, _C["Bridge"], cls[sub])
                inst[sub] = np.where(m, b_inst, inst[sub])
                tu[sub] = np.where(m, (u[None, :] - cx) * zb / f, tu[sub])
                tv[sub] = np.where(m, hc + (yh - v[top:bot, None]) * zb / f, tv[sub])
                shade[sub] = np.where(m, 0.8, shade[sub])
                upright[sub] = upright[sub] | m

    # camera-facing boards, far to near
    placed = []
    for b in scene.boards:
        zb = b.z + b.speed * t - ego
        if zb > 0.8:
            placed.append((zb, b))
    placed.sort(key=lambda p: -p[0])
    for zb, b in placed:
        u0 = cx + f * (b.x - b.width / 2) / zb
        u1 = cx + f * (b.x + b.width / 2) / zb
        vt = yh - f * (b.y0 + b.height - hc) / zb
        vb = yh - f * (b.y0 - hc) / zb
        c0, c1 = max(int(np.floor(u0)), 0), min(int(np.ceil(u1)), W)
        r0, r1 = max(int(np.floor(vt)), 0), min(int(np.ceil(vb)), H)
        if c1 <= c0 or r1 <= r0:
            continue
        a = (u[c0:c1][None, :] - u0) / max(u1 - u0, 1e-6)
        bb = (vb - v[r0:r1][:, None]) / max(vb - vt, 1e-6)
        inside = (a >= 0) & (a <= 1) & (bb >= 0) & (bb <= 1)
        if b.shape == "ellipse":
            inside &= (a - 0.5) ** 2 + (bb - 0.5) ** 2 <= 0.25
        elif b.shape == "car":
            inside &= (bb < 0.58) | ((a > 0.14) & (a < 0.86))
        elif b.shape == "truck":
            inside &= (bb < 0.75) | (a > 0.05) & (a < 0.95)
        elif b.shape == "bike":
            inside &= (bb < 0.55) | ((a > 0.25) & (a < 0.75))
        elif b.shape == "person":
            body = (a > 0.18) & (a < 0.82) & (bb < 0.83)
            head = ((a - 0.5) / 0.28) ** 2 + ((bb - 0.91) / 0.09) ** 2 <= 1.0
            inside &= body | head
        sub = np.s_[r0:r1, c0:c1]
        m = inside & (zb < z[sub])
        if not m.any():
            continue
        z[sub] = np.where(m, zb, z[sub])
        cls[sub] = np.where(m, b.cls, cls[sub])
        inst[sub] = np.where(m, b.inst, inst[sub])
        tu[sub] = np.where(m, a * b.width, tu[sub])
        tv[sub] = np.where(m, bb, tv[sub])  # boards keep the relative height 0..1
        shade[sub] = np.where(m, 0.88, shade[sub])
        upright[sub] = upright[sub] | m
    return Frame(z=z, cls=cls, inst=inst, tu=tu, tv=tv, shade=shade, upright=upright)


# ---------------------------------------------------------------------------------------
# appearance: class colours and textures, then weather
# ---------------------------------------------------------------------------------------
_SKY = {
    "sun": ((70, 130, 205), (175, 205, 235)),
    "cloud": ((150, 155, 165), (205, 205, 210)),
    "night": ((6, 8, 20), (22, 22, 38)),
    "fog": ((190, 190, 195), (195, 195, 200)),
    "rain": ((105, 110, 120), (150, 150, 160)),
}
_FOG_AIR = np.array([190.0, 190.0, 195.0], dtype=np.float32)


def albedo(scene: Scene, fr: Frame) -> tuple[np.ndarray, np.ndarray]:
    """Surface colour (H, W, 3) and night-time emission (H, W, 3), floats in 0..255."""
    H, W = fr.z.shape
    rgb = np.zeros((H, W, 3), dtype=np.float32)
    glow = np.zeros((H, W, 3), dtype=np.float32)
    night = scene.condition == "night"
    for c in np.unique(fr.cls):
        m = fr.cls == c
        tu, tv, inst = fr.tu[m], fr.tv[m], fr.inst[m]
        fine = _hash(np.floor(tu * 6), np.floor(tv * 6), int(c))
        coarse = _hash(np.floor(tu * 0.8), np.floor(tv * 0.8), int(c) + 97)
        tint = scene.tints[inst]
        name = CLASSES[c]
        col: np.ndarray
        emit = np.zeros_like(tint)
        if name == "Sky":
            lo, hi = _SKY[scene.condition]
            rows = np.nonzero(m)[0].astype(np.float32) / max(scene.horizon * H, 1.0)
            mix = np.clip(rows, 0, 1)[:, None]
            col = np.asarray(lo, np.float32) * (1 - mix) + np.asarray(hi, np.float32) * mix
        elif name == "Road":
            col = np.array([88, 86, 92], np.float32) + (fine[:, None] - 0.5) * 22
        elif name == "RoadLine":
            col = np.array([228, 220, 170], np.float32) + fine[:, None] * 10
        elif name == "SideWalk":
            grout = (np.mod(tu * 2, 1) < 0.08) | (np.mod(tv * 2, 1) < 0.08)
            col = np.array([172, 150, 160], np.float32) * np.where(grout, 0.72, 1.0)[:, None]
        elif name in ("Terrain", "Ground"):
            base = (112, 140, 62) if name == "Terrain" else (128, 104, 82)
            col = np.asarray(base, np.float32) * (0.75 + 0.5 * coarse[:, None])
            col += (fine[:, None] - 0.5) * 25
        elif name == "Building":
            win = (np.mod(tu / 3.0, 1) > 0.25) & (np.mod(tu / 3.0, 1) < 0.75) & \
                  (np.mod(tv / 3.2, 1) > 0.3) & (np.mod(tv / 3.2, 1) < 0.8) & (tv > 1.6)
            col = tint * (0.9 + 0.2 * fine[:, None])
            glass = np.array([70, 85, 105], np.float32)
            col = np.where(win[:, None], glass, col)
            if night:
                on = _hash(np.floor(tu / 3.0), np.floor(tv / 3.2), int(inst[0]) if inst.size
                           else 0) < 0.45
                emit = np.where((win & on)[:, None], np.array([255, 215, 140], np.float32), 0)
        elif name == "Wall":
            course = np.mod(tv / 0.6, 1) < 0.08
            col = tint * np.where(course, 0.7, 1.0)[:, None] + (fine[:, None] - 0.5) * 12
        elif name == "Fence":
            slat = np.mod(tu * 5, 1) < 0.35
            col = tint * np.where(slat, 0.55, 1.0)[:, None]
        elif name == "Vegetation":
            col = tint * (0.65 + 0.6 * fine[:, None])
        elif name == "TrafficLight":
            lamp = ((tv > 0.7) & (tv < 0.9)) | ((tv > 0.4) & (tv < 0.6))
            lamp_col = np.array([240, 60, 40], np.float32)
            col = np.where(lamp[:, None], lamp_col, tint)
            emit = np.where(lamp[:, None], lamp_col, 0)
        elif name in ("Cars", "Bus", "Truck", "TwoWheeler"):
            col = tint * (0.92 + 0.16 * fine[:, None])
            if name == "Cars":
                window = tv > 0.62
            elif name == "Bus":
                window = (tv > 0.55) & (tv < 0.82)
            elif name == "Truck":
                window = (tv > 0.80)
            else:
                window = tv > 0.7
            col = np.where(window[:, None], np.array([45, 55, 65], np.float32), col)
            wheel = tv < 0.12
            col = np.where(wheel[:, None], np.array([25, 25, 25], np.float32), col)
            lights = (tv > 0.25) & (tv < 0.38)
            col = np.where(lights[:, None] & (fine[:, None] > 0.7),
                           np.array([200, 40, 30], np.float32), col)
            emit = np.where(lights[:, None], np.array([230, 50, 40], np.float32), 0)
        elif name == "Pedestrian":
            skin = tv > 0.83
            col = np.where(skin[:, None], np.array([205, 165, 135], np.float32), tint)
        elif name == "Bridge":
            col = tint * (0.85 + 0.3 * fine[:, None])
        else:  # Pole, TrafficSign, Static and anything added later
            col = tint * (0.9 + 0.2 * fine[:, None])
        shade = fr.shade[m][:, None] if name != "Sky" else 1.0
        rgb[m] = col * shade
        if night:
            glow[m] = emit
    return np.clip(rgb, 0, 255), glow


def apply_weather(scene: Scene, rgb: np.ndarray, glow: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Scene radiance as the camera would see it in the scene's weather (no sensor noise)."""
    sky = z >= _FAR
    out = rgb.copy()
    cond = scene.condition
    if cond == "sun":
        out = np.where(sky[..., None], out, out * 1.08)
    elif cond == "cloud":
        grey = out.mean(axis=2, keepdims=True)
        out = np.where(sky[..., None], out, (0.55 * out + 0.45 * grey) * 0.85 + 10)
    elif cond == "night":
        out = np.where(sky[..., None], out, out * 0.14) + glow * 0.9
        # street lamps: a soft pool of light near the kerb at the bottom of the image
        H, W = z.shape
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        pool = np.exp(-(((yy - H) / (0.35 * H)) ** 2 + ((xx - W / 2) / (0.6 * W)) ** 2))
        out = out + (rgb * 0.25 * pool[..., None]) * (~sky)[..., None]
    elif cond == "fog":
        tr = np.exp(-scene.fog_beta * np.minimum(z, 500.0))[..., None]
        out = out * tr + _FOG_AIR * (1.0 - tr)
    elif cond == "rain":
        grey = out.mean(axis=2, keepdims=True)
        out = np.where(sky[..., None], out, (0.7 * out + 0.3 * grey) * 0.72)
        out = out * np.array([0.95, 0.97, 1.05], np.float32)
    return np.clip(out, 0, 255)


def _box_blur_h(img: np.ndarray, length: int) -> np.ndarray:
    pad = length // 2
    padded = np.pad(img, ((0, 0), (pad, length - 1 - pad), (0, 0)), mode="edge")
    c = np.cumsum(padded, axis=1, dtype=np.float64)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    return ((c[:, length:] - c[:, :-length]) / length).astype(np.float32)


def camera(scene: Scene, radiance: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RGB sensor: rain streaks, noise and the scene's camera failure, quantised to uint8."""
    H, W, _ = radiance.shape
    img = radiance.copy()
    if scene.condition == "rain":
        n = int(0.004 * H * W)
        length = max(4, H // 24)
        ys = rng.integers(0, H, n)
        xs = rng.integers(0, W, n)
        for k in range(length):
            yy = np.clip(ys + k, 0, H - 1)
            xx = np.clip(xs + k // 3, 0, W - 1)
            img[yy, xx] = img[yy, xx] * 0.5 + 115.0
    if scene.case == "motionblur":
        img = _box_blur_h(img, max(5, W // 18) | 1)
    elif scene.case == "overexposure":
        img = img * 2.4 + 60.0
    elif scene.case == "underexposure":
        img = img * 0.18
    sigma = {"night": 7.0, "rain": 3.0}.get(scene.condition, 1.5)
    if scene.case == "underexposure":
        sigma += 2.0
    img = img + rng.normal(0.0, sigma, size=img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def events(prev: np.ndarray, cur: np.ndarray, scene: Scene,
           rng: np.random.Generator) -> np.ndarray:
    """Event frame from the log-intensity change: positive red, negative blue, else black."""
    if scene.case == "eventlowres":
        H, W = cur.shape[:2]
        prev = prev.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3))
        cur = cur.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3))
    lp = np.log(prev.mean(axis=2) + 3.0)
    lc = np.log(cur.mean(axis=2) + 3.0)
    diff = lc - lp
    thresh = 0.18
    pos = diff > thresh
    neg = diff < -thresh
    rate = 0.01 if scene.condition == "night" else 0.002
    noise = rng.random(diff.shape)
    pos |= noise < rate / 2
    neg |= (noise >= rate / 2) & (noise < rate)
    out = np.zeros((*diff.shape, 3), dtype=np.uint8)
    out[pos, 0] = 255
    out[neg & ~pos, 2] = 255
    return out


def lidar(scene: Scene, z: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sparse scan lines: up to 32 beams from -25 to +3 degrees (fewer on small images, so
    lines stay apart), range coded 255 (near) .. 1 (100 m), 0 where there is no return."""
    H, W = z.shape
    f = scene.focal * W
    yh = scene.horizon * H
    elev = np.radians(np.linspace(-25.0, 3.0, min(32, H // 8)))
    rows = np.round(yh - f * np.tan(elev) - 0.5).astype(int)
    rows = np.unique(rows[(rows >= 0) & (rows < H)])
    step = max(2, W // 128)
    cols = np.arange(step // 2, W, step)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    rr, cc = rr.ravel(), cc.ravel()
    rng_m = z[rr, cc].astype(np.float32)
    max_range = 35.0 if scene.condition == "fog" else 100.0
    keep = rng_m < max_range
    if scene.condition == "rain":
        keep &= rng.random(keep.shape) > 0.2
    if scene.case == "lidarjitter":
        sigma = max(1.0, W / 128)
        rr = np.clip(np.round(rr + rng.normal(0, sigma, rr.shape)), 0, H - 1).astype(int)
        cc = np.clip(np.round(cc + rng.normal(0, sigma, cc.shape)), 0, W - 1).astype(int)
        rng_m = rng_m * (1.0 + rng.normal(0, 0.08, rng_m.shape)).astype(np.float32)
    value = np.clip(np.round(255.0 * (1.0 - rng_m / 100.0)), 1, 255).astype(np.uint8)
    out = np.zeros((H, W), dtype=np.uint8)
    out[rr[keep], cc[keep]] = value[keep]
    return out


def hha(fr: Frame, scene: Scene) -> np.ndarray:
    """HHA-style geometry image: disparity, height above ground, angle to gravity."""
    H, W = fr.z.shape
    f = scene.focal * W
    yh = scene.horizon * H
    sky = fr.z >= _FAR
    v = np.arange(H, dtype=np.float32)[:, None] + 0.5
    height = np.clip(scene.cam_height + (yh - v) * fr.z / f, 0.0, 30.0)
    disparity = np.clip(2.0 / np.sqrt(np.maximum(fr.z, 1e-3)), 0.0, 1.0) * 255.0
    out = np.stack([
        disparity,
        height / 30.0 * 255.0,
        np.where(fr.upright, 100.0, 200.0),
    ], axis=2)
    out[sky] = 0
    return np.round(out).astype(np.uint8)


def depth_mm(fr: Frame) -> np.ndarray:
    """Metric depth in millimetres, uint16 (sky and beyond 65.5 m saturate at 65535)."""
    return np.clip(np.round(fr.z * 1000.0), 0, 65535).astype(np.uint16)


def semantic(fr: Frame) -> np.ndarray:
    """DELIVER label PNG: red = class id + 1, green/blue = instance id (as CARLA writes)."""
    return np.stack([
        (fr.cls.astype(np.int32) + 1).astype(np.uint8),
        (fr.inst & 0xFF).astype(np.uint8),
        ((fr.inst >> 8) & 0xFF).astype(np.uint8),
    ], axis=2)


# ---------------------------------------------------------------------------------------
# writing the data set
# ---------------------------------------------------------------------------------------
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


def _remove_stale_tmp(out: Path) -> None:
    """Drop temporary folders left by killed runs (their process no longer exists)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # another user's live process


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
    _remove_stale_tmp(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
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


SAMPLE = register(DeliverReader(
    name="sample", default_root="data/deliver-sample",
    how_to_get="generate it with `pipeline make-sample --out data/deliver-sample`",
    # scored at its own 256 px: the official 1024 resize would upsample it 4x for nothing
    eval_protocol="native"))
