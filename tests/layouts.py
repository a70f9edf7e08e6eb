"""Writers of tiny data sets in the exact real on-disk layouts (DELIVER, MCubeS).

They record what they wrote so tests can compare decoded samples with the source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

H, W = 24, 32  # not square, so a transposed read fails the tests

DELIVER_SCENES = {
    # (condition, split): [scene names]
    ("cloud", "train"): ["MAP_1_point1", "MAP_2_point4_eventlowres"],
    ("night", "train"): ["MAP_3_point2_motionblur"],
    ("fog", "val"): ["MAP_4_point7", "MAP_5_point3_lidarjitter"],
    ("sun", "test"): ["MAP_6_point9_overexposure"],
}
FRAMES = ("000120", "000130")


def save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def write_deliver(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """DELIVER tree with hha/ and depth/, 1- and 4-channel PNGs, label noise in G/B,
    and half-size event images in `_eventlowres` scenes."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, np.ndarray]] = {}
    n = 0
    for (cond, split), scenes in DELIVER_SCENES.items():
        for scene in scenes:
            rel = Path(cond) / split / scene
            for frame in FRAMES:
                n += 1
                rec: dict[str, np.ndarray] = {}
                rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                if n % 3 == 0:  # some RGB files carry an alpha channel
                    rgba = np.concatenate([rgb, np.full((H, W, 1), 255, np.uint8)], axis=2)
                    save(root / "img" / rel / f"{frame}_rgb_front.png", rgba)
                else:
                    save(root / "img" / rel / f"{frame}_rgb_front.png", rgb)
                rec["rgb"] = rgb
                # HHA alternates 3-channel, 1-channel and 4-channel files
                if n % 3 == 1:
                    hha = rng.integers(0, 256, (H, W), dtype=np.uint8)
                    save(root / "hha" / rel / f"{frame}_depth_front.png", hha)
                    rec["depth"] = np.repeat(hha[:, :, None], 3, axis=2)
                elif n % 3 == 2:
                    hha = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
                    save(root / "hha" / rel / f"{frame}_depth_front.png", hha)
                    rec["depth"] = hha[:, :, :3]
                else:
                    hha = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                    save(root / "hha" / rel / f"{frame}_depth_front.png", hha)
                    rec["depth"] = hha
                depth_mm = rng.integers(0, 65536, (H, W), dtype=np.uint16)
                save(root / "depth" / rel / f"{frame}_depth_front.png", depth_mm)
                rec["depth_raw_mm"] = depth_mm
                if scene.endswith("_eventlowres"):
                    ev = rng.integers(0, 256, (H // 2, W // 2, 3), dtype=np.uint8)
                    rec["event"] = np.repeat(np.repeat(ev, 2, axis=0), 2, axis=1)
                else:
                    ev = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                    rec["event"] = ev
                save(root / "event" / rel / f"{frame}_event_front.png", ev)
                rec["event_file"] = ev
                if n % 2:
                    lidar = rng.integers(0, 256, (H, W), dtype=np.uint8)
                    save(root / "lidar" / rel / f"{frame}_lidar_front.png", lidar)
                    rec["lidar"] = np.repeat(lidar[:, :, None], 3, axis=2)
                else:
                    lidar = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
                    save(root / "lidar" / rel / f"{frame}_lidar_front.png", lidar)
                    rec["lidar"] = lidar[:, :, :3]
                red = rng.integers(0, 26, (H, W), dtype=np.uint8)
                red[0, :4] = 255
                red[1, :4] = 0
                red[2, :25] = np.arange(1, 26)
                sem = np.stack([red, rng.integers(0, 256, (H, W), dtype=np.uint8),
                                rng.integers(0, 256, (H, W), dtype=np.uint8)], axis=2)
                save(root / "semantic" / rel / f"{frame}_semantic_front.png", sem)
                rec["label_red"] = red
                written[f"{cond}/{split}/{scene}/{frame}"] = rec
    return written


MCUBES_LISTS = {
    "train": ["outscene1208_2_0000000150", "outscene1208_2_0000000300"],
    "val": ["outscene1208_3_0000000060"],
    "test": ["outscene1208_4_0000000090", "outscene1208_4_0000000120"],
}
MCUBES_H, MCUBES_W = 16, 212  # the 192-column crop leaves 20 > 16 rows, as 1032 > 1024


def write_mcubes(root: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """MCubeS multimodal_dataset tree with PNG RGB/NIR/GT, .npy AoLP/DoLP and split lists."""
    rng = np.random.default_rng(seed)
    written = {}
    (root / "list_folder").mkdir(parents=True)
    for split, names in MCUBES_LISTS.items():
        (root / "list_folder" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for name in names:
            shape = (MCUBES_H, MCUBES_W)
            rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
            sin = rng.uniform(-1, 1, shape).astype(np.float32)
            cos = rng.uniform(-1, 1, shape).astype(np.float32)
            dolp = rng.uniform(0, 1, shape).astype(np.float32)
            nir = rng.integers(0, 256, shape, dtype=np.uint8)
            gt = rng.integers(0, 20, shape, dtype=np.uint8)
            gt[0, :3] = 255
            save(root / "polL_color" / f"{name}.png", rgb)
            for folder, arr in (("polL_aolp_sin", sin), ("polL_aolp_cos", cos),
                                ("polL_dolp", dolp)):
                (root / folder).mkdir(exist_ok=True)
                np.save(root / folder / f"{name}.npy", arr)
            save(root / "NIR_warped" / f"{name}.png", nir)
            save(root / "NIR_warped_mask" / f"{name}.png", np.full(shape, 255, np.uint8))
            save(root / "GT" / f"{name}.png", gt)
            written[name] = {"rgb": rgb, "sin": sin, "cos": cos, "dolp": dolp, "nir": nir,
                             "gt": gt}
    return written
