"""Teacher patch codes as dense per-pixel targets (the data side of teacher-code
distillation; the translators and losses are `stages.student.codes`). Kept apart from the
losses so the data path, which CodeAlign's stages share, does not depend on loss code.

- `code_map` puts a sample's cached code grid onto its image pixels through the teacher's
  own view (short side resized to the branch's input size, centre crop, grid x grid
  patches), so the student's augmentation (resize, crop, flip) moves codes with labels.
- `isolated_modality`: the one modality a training sample shows under
  `train.single_modality`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

NO_CODE = -1  # pixels outside the teacher's view, padding: ignored by the loss


@lru_cache(maxsize=16)
def _index_map(h: int, w: int, image_size: int, grid: int) -> np.ndarray:
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = image_size, int(image_size * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
    patch = image_size / grid
    ys = np.floor(((np.arange(h) + 0.5) * new_h / h - top) / patch).astype(np.int64)
    xs = np.floor(((np.arange(w) + 0.5) * new_w / w - left) / patch).astype(np.int64)
    inside = (ys[:, None] >= 0) & (ys[:, None] < grid) & (xs[None] >= 0) & (xs[None] < grid)
    flat = ys[:, None] * grid + xs[None]
    return np.where(inside, flat, NO_CODE)


def code_map(codes: np.ndarray, h: int, w: int, image_size: int) -> torch.Tensor:
    """(M, g, g) codes of one sample -> (M, h, w) long per image pixel (NO_CODE outside
    the teacher's centre crop)."""
    grid = codes.shape[-1]
    index = _index_map(h, w, image_size, grid)
    flat = codes.reshape(codes.shape[0], -1).astype(np.int64)
    out = np.where(index >= 0, flat[:, np.maximum(index, 0)], NO_CODE)
    return torch.from_numpy(out)


def isolated_modality(seed: int, step: int, index: int, n_modalities: int) -> int:
    """The modality sample `index` shows at `step` under single_modality: a pure function of
    (seed, step, index), never of a process RNG, so workers and resumes agree."""
    return int(np.random.default_rng([seed, step, index, 0x150]).integers(n_modalities))


def at_features(codes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, M, H, W) pixel codes -> (B, M, h, w): the code at each feature cell's centre."""
    h_in, w_in = codes.shape[-2:]
    ys = ((torch.arange(size[0], device=codes.device) + 0.5) * h_in / size[0]).long()
    xs = ((torch.arange(size[1], device=codes.device) + 0.5) * w_in / size[1]).long()
    return codes[..., ys.clamp(max=h_in - 1)[:, None], xs.clamp(max=w_in - 1)[None]]
