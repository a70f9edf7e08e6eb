"""The street a generated scene shows: layout, objects and their colours, drawn from a seed.

World coordinates: X right, Y up from the ground, Z forward; the ego camera moves along Z
(`any2seg.synth.render` draws it). Everything comes from the `rng` passed in, so a seed
gives the same scene on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from any2seg.deliver_taxonomy import CLASSES

CLASS_ID = {name: i for i, name in enumerate(CLASSES)}


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
        return CLASS_ID["Cars"], rng.uniform(1.7, 2.0), rng.uniform(1.4, 1.6), "car"
    if r < 0.7:
        return CLASS_ID["Truck"], rng.uniform(2.4, 2.6), rng.uniform(3.0, 3.6), "truck"
    if r < 0.82:
        return CLASS_ID["Bus"], rng.uniform(2.5, 2.7), rng.uniform(2.9, 3.2), "bus"
    return CLASS_ID["TwoWheeler"], rng.uniform(0.7, 0.9), rng.uniform(1.4, 1.7), "bike"


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
        ground.append(CLASS_ID["Terrain"] if kind == "green" else CLASS_ID["Ground"])
        z = rng.uniform(-2.0, 4.0)
        while z < z_end:
            length = rng.uniform(8.0, 24.0)
            if kind == "buildings":
                if rng.random() < 0.8:
                    c = facade_colours[rng.integers(len(facade_colours))]
                    seg = Segment(CLASS_ID["Building"], new_inst(tuple(c)), z, z + length,
                                  rng.uniform(7.0, 26.0))
                else:
                    seg = Segment(CLASS_ID["Wall"], new_inst((135, 130, 140)), z, z + length,
                                  rng.uniform(2.0, 3.5))
                segments[side].append(seg)
                z += length + (rng.uniform(0.0, 6.0) if rng.random() < 0.4 else 0.0)
            elif kind == "fenced":
                segments[side].append(Segment(CLASS_ID["Fence"], new_inst((125, 95, 70)), z,
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
                boards.append(Board(CLASS_ID["Vegetation"], new_inst((90, 70, 50)), tx, tz,
                                    0.35, trunk_h))
                g = (rng.uniform(40, 80), rng.uniform(100, 140), rng.uniform(30, 60))
                boards.append(Board(CLASS_ID["Vegetation"], new_inst(g), tx, tz - 0.05, crown,
                                    crown * rng.uniform(0.9, 1.3), y0=trunk_h * 0.8,
                                    shape="ellipse"))
        # poles with signs or traffic lights at the kerb
        z = rng.uniform(5.0, 20.0)
        while z < z_end:
            px = sign * (road_half + 0.4)
            ph = rng.uniform(3.2, 5.0)
            boards.append(Board(CLASS_ID["Pole"], new_inst((150, 150, 155)), px, z, 0.18, ph))
            if rng.random() < 0.55:
                colour = (200, 30, 30) if rng.random() < 0.5 else (30, 70, 200)
                boards.append(Board(CLASS_ID["TrafficSign"], new_inst(colour), px, z - 0.05, 0.8,
                                    0.8, y0=ph - 0.9, shape="ellipse" if rng.random() < 0.5
                                    else "rect"))
            else:
                boards.append(Board(CLASS_ID["TrafficLight"], new_inst((35, 35, 35), emissive=True),
                                    px - sign * 0.3, z - 0.05, 0.45, 1.1, y0=ph - 1.1,
                                    shape="light"))
            z += rng.uniform(14.0, 30.0)
        # pedestrians and street furniture on the sidewalk
        for _ in range(rng.integers(1, 5)):
            pz = rng.uniform(4.0, 60.0)
            px = sign * (road_half + sidewalk * rng.uniform(0.2, 0.9))
            clothes = tuple(rng.integers(20, 230, size=3).tolist())
            boards.append(Board(CLASS_ID["Pedestrian"], new_inst(clothes), px, pz,
                                rng.uniform(0.5, 0.7), rng.uniform(1.6, 1.9), shape="person",
                                speed=rng.uniform(-0.3, 0.3)))
        for _ in range(rng.integers(0, 3)):
            boards.append(Board(CLASS_ID["Static"], new_inst((100, 120, 110)),
                                sign * (road_half + sidewalk * rng.uniform(0.5, 0.95)),
                                rng.uniform(5.0, 70.0), rng.uniform(0.6, 1.2),
                                rng.uniform(0.7, 1.2)))
    # traffic in both lanes
    for _ in range(rng.integers(2, 7)):
        cls, w, h, shape = _vehicle_spec(rng)
        lane = -1.0 if rng.random() < 0.5 else 1.0
        colour = tuple(rng.integers(20, 235, size=3).tolist())
        if cls == CLASS_ID["Bus"]:
            colour = (220, 180, 30) if rng.random() < 0.5 else (190, 40, 40)
        if cls == CLASS_ID["Truck"]:
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
