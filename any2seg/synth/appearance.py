"""What a rendered view looks like: class colours and textures (with night-time emission),
then the weather's effect on the light reaching the camera (before any sensor noise)."""

from __future__ import annotations

import numpy as np

from any2seg.deliver_taxonomy import CLASSES
from any2seg.synth.render import FAR, Frame
from any2seg.synth.scene import Scene

_SKY = {
    "sun": ((70, 130, 205), (175, 205, 235)),
    "cloud": ((150, 155, 165), (205, 205, 210)),
    "night": ((6, 8, 20), (22, 22, 38)),
    "fog": ((190, 190, 195), (195, 195, 200)),
    "rain": ((105, 110, 120), (150, 150, 160)),
}
_FOG_AIR = np.array([190.0, 190.0, 195.0], dtype=np.float32)


def _hash(a: np.ndarray, b: np.ndarray, salt: int = 0) -> np.ndarray:
    """Deterministic value noise in [0, 1) from integer lattice coordinates."""
    h = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (salt * 83492791)
    h = (h ^ (h >> 13)) * 1274126177
    h = h ^ (h >> 16)
    return ((h & 0xFFFF).astype(np.float32)) / 65536.0


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
    sky = z >= FAR
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
