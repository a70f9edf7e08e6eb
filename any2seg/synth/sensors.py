"""The sensors of a generated frame: RGB camera (noise, rain, camera failures), event camera,
LiDAR scan lines, depth and HHA, and the DELIVER label image, each as DELIVER stores it."""

from __future__ import annotations

import numpy as np

from any2seg.synth.render import FAR, Frame
from any2seg.synth.scene import Scene


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
    sky = fr.z >= FAR
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
