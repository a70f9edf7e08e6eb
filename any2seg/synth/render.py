"""Rasterising a scene: the z-buffered ground plane, facade planes and camera-facing boards
as one view's per-pixel geometry (`Frame`), which appearance and every sensor read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from any2seg.synth.scene import CLASS_ID, Scene

FAR = np.float32(1e4)  # "infinite" depth for the sky


@dataclass
class Frame:
    """Per-pixel geometry and surface parameters of one rendered view."""

    z: np.ndarray  # depth along the optical axis (m), FAR for sky
    cls: np.ndarray  # class index, uint8
    inst: np.ndarray  # instance id, int32 (0 for stuff)
    tu: np.ndarray  # texture coordinates in metres
    tv: np.ndarray
    shade: np.ndarray  # Lambert-ish factor
    upright: np.ndarray  # True where the surface is vertical (for HHA)


def render(scene: Scene, t: int, size: int) -> Frame:
    """Rasterise the scene as seen after `t` forward steps of the ego vehicle."""
    H = W = size
    f = scene.focal * W
    cx, yh = W / 2.0, scene.horizon * H
    hc = scene.cam_height
    ego = t * scene.step
    u = np.arange(W, dtype=np.float32) + 0.5
    v = np.arange(H, dtype=np.float32) + 0.5

    z = np.full((H, W), FAR, dtype=np.float32)
    cls = np.full((H, W), CLASS_ID["Sky"], dtype=np.uint8)
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
    g_cls = np.where(ax < scene.road_half + scene.sidewalk, CLASS_ID["SideWalk"], g_cls)
    g_cls = np.where(ax < scene.road_half, CLASS_ID["Road"], g_cls)
    line = (np.abs(ax - 0.0) < 0.12) & (np.mod(zw, 2 * scene.dash) < scene.dash)
    kerb_lines = np.abs(ax - (scene.road_half - 0.25)) < 0.08
    g_cls = np.where(line | kerb_lines, CLASS_ID["RoadLine"], g_cls)
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
                cls[sub] = np.where(m, CLASS_ID["Bridge"], cls[sub])
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
