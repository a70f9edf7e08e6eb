"""Samples + cached teacher targets -> tensors for the student.

Augmentation draws from `numpy.random.default_rng([seed, epoch, index])`, so a batch
depends only on its position in the schedule, not on worker count or on whether the
run was resumed; that is what makes `--resume` end at the same weights. Its arithmetic
does not depend on torch's thread count either (a loader worker runs one thread, the
main process several): the resize is `resize_bilinear` (torch's one-thread kernel at any
count) and the jitter's mean is summed per channel first (`_mean`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from any2seg.config import Where
from any2seg.datasets import Sample, SampleSequence
from any2seg.datasets.resize import resize_bilinear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE = 255


@dataclass
class AugmentConfig:
    """The `train.augment` group of params.yaml."""

    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])
    flip: bool = True
    jitter: float = 0.2  # probability of colour jitter on RGB
    blur: float = 0.2  # probability of Gaussian blur on RGB

    def validate(self, where: Where | None = None) -> None:
        where = where or Where("train.augment", None)
        scale = self.scale
        if len(scale) != 2 or not all(math.isfinite(s) for s in scale) or \
                not 0 < scale[0] <= scale[1]:
            where.fail("scale", "[lo, hi] with 0 < lo <= hi (the short side is resized to "
                       "crop * U(lo, hi))", scale)
        for name in ("jitter", "blur"):
            where.number(name, getattr(self, name), 0, 1, why="a probability")


# arrays, label -> arrays, label at the resolution an evaluation protocol scores
Transform = Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def to_unit(arr: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """H x W x 3 image as stored in a `Sample` -> (3, H, W) float32 model input before
    mean/std: integer images / 255 (DELIVER / MISS `Normalize`: `.float() / 255`, also for
    uint16 depth), float images as they are (MCubeS AoLP / DoLP / 16-bit NIR).

    One pass writes the float copy in (3, H, W) order and the division runs in place:
    the same numbers as transposing, converting and dividing into new arrays (integers
    up to 65535 are exact in float32), with one full-frame copy instead of three. With
    `out` (a float32 (3, H, W) tensor, e.g. a batch item's slot) it is written there."""
    src = torch.from_numpy(arr).permute(2, 0, 1)
    x = torch.empty(src.shape, dtype=torch.float32) if out is None else out
    x.copy_(src)
    return x.div_(255.0) if np.issubdtype(arr.dtype, np.integer) else x


def normalise(name: str, img: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) `to_unit` scale -> RGB: ImageNet mean/std (`TF.normalize`); other
    modalities are fed as they are (as DELIVER, CMNeXt and MISS). With `out`, the result
    is written there (the same numbers, without a temporary)."""
    if name == "rgb":
        mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        std = torch.tensor(IMAGENET_STD)[:, None, None]
        if out is None:
            return (img - mean) / std
        return torch.sub(img, mean, out=out).div_(std)
    return img if out is None else out.copy_(img)


def model_input(arrays: dict[str, np.ndarray], modalities: Sequence[str]) -> torch.Tensor:
    """Stored arrays (H x W x 3, after any protocol resize) -> the (M, 3, H, W) input the
    student is evaluated on: each modality converted (`to_unit`) and normalised in its slot
    (what evaluation and prediction feed the student)."""
    h, w, c = arrays[modalities[0]].shape
    stacked = torch.empty((len(modalities), c, h, w), dtype=torch.float32)
    for i, m in enumerate(modalities):
        normalise(m, to_unit(arrays[m], out=stacked[i]), out=stacked[i])
    return stacked


def black(name: str) -> torch.Tensor:
    """(3,) value of an all-black frame of `name` after normalisation: what MISS feeds for a
    missing sensor (RGB -> -mean/std, about (-2.118, -2.036, -1.804); the others 0)."""
    return normalise(name, torch.zeros(3, 1, 1)).flatten()


REDUCE_ONE_THREAD = 32768  # torch reduces fewer elements on one thread (its GRAIN_SIZE)


def _mean(img: torch.Tensor) -> torch.Tensor:
    """The mean of a (C, H, W) image with the same bits at every thread count: torch splits
    one full reduction of a large crop across its threads, so `img.mean()` has other bits
    at one thread than at two; there the sum runs per channel first (each channel's sum
    stays on one thread). Smaller crops keep `img.mean()`, already one-threaded."""
    if img.numel() < REDUCE_ONE_THREAD:
        return img.mean()
    return img.reshape(img.shape[0], -1).sum(1).sum() / img.numel()


def _gaussian_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(round(2 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    c = img.shape[0]
    img = F.conv2d(F.pad(img[None], (radius, radius, 0, 0), mode="replicate"),
                   k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    img = F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"),
                   k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return img[0]


@functools.lru_cache(maxsize=256)
def nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """The source index of every output row (or column) under torch's `nearest`, taken from
    torch's own kernel on a ramp (each output pixel reads (row(i), column(j)), one rule per
    axis), so a gather reproduces `F.interpolate(..., mode="nearest")` exactly."""
    ramp = torch.arange(size_in, dtype=torch.float32)[None, None, :, None]
    index = F.interpolate(ramp, size=(size_out, 1), mode="nearest")[0, 0, :, 0]
    return index.to(torch.int64).numpy()


def nearest_window(src: torch.Tensor, size: tuple[int, int], top: int, left: int, crop: int,
                   fill: int) -> torch.Tensor:
    """The `crop` x `crop` window at (top, left) of `src` (..., h, w) resized to `size` with
    `nearest` and padded with `fill` below and right: the numbers of resizing the whole
    integer map through float (exact up to 2**24), padding and cropping, as a gather of
    the window's pixels only. Returns int64."""
    (h, w), (nh, nw) = src.shape[-2:], size
    rows = nearest_index(h, nh)[top:top + crop]
    cols = nearest_index(w, nw)[left:left + crop]
    out = torch.full((*src.shape[:-2], crop, crop), fill, dtype=torch.int64)
    rows_t, cols_t = torch.from_numpy(rows), torch.from_numpy(cols)
    out[..., :len(rows), :len(cols)] = src[..., rows_t[:, None], cols_t].long()
    return out


def augment(images: dict[str, torch.Tensor], label: torch.Tensor, crop: int,
            cfg: AugmentConfig, rng: np.random.Generator,
            maps: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random resize (short side = crop * U(scale)), crop with padding (label 255), flip,
    for every modality and the label; colour jitter and blur on RGB only. Images are in
    `to_unit` scale (RGB in [0, 1]). `maps` (C, H, W) long (teacher codes per pixel) move
    as the label does (nearest, padded with -1); with them the result is
    (images, label, maps) and the random draws are the same as without."""
    h, w = label.shape
    s = rng.uniform(*cfg.scale) * crop / min(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    images = {m: resize_bilinear(x[None], nh, nw)[0] for m, x in images.items()}
    ph, pw = max(0, crop - nh), max(0, crop - nw)
    if ph or pw:
        images = {m: F.pad(x, (0, pw, 0, ph)) for m, x in images.items()}
    top = int(rng.integers(0, nh + ph - crop + 1))
    left = int(rng.integers(0, nw + pw - crop + 1))
    images = {m: x[:, top:top + crop, left:left + crop] for m, x in images.items()}
    # the label and codes resize as `nearest` does, padded (255 / -1) and cropped: a gather
    label = nearest_window(label, (nh, nw), top, left, crop, IGNORE)
    if maps is not None:
        maps = nearest_window(maps, (nh, nw), top, left, crop, -1)
    if cfg.flip and rng.random() < 0.5:
        images = {m: x.flip(-1) for m, x in images.items()}
        label = label.flip(-1)
        if maps is not None:
            maps = maps.flip(-1)
    if "rgb" in images:
        rgb = images["rgb"]
        if rng.random() < cfg.jitter:
            b, c, sat = rng.uniform(0.8, 1.2, size=3)
            grey = rgb.mean(0, keepdim=True)
            rgb = (rgb - grey) * sat + grey
            mean = _mean(rgb)
            rgb = (rgb - mean) * c + mean
            rgb = (rgb * b).clamp(0, 1)
        if rng.random() < cfg.blur:
            rgb = _gaussian_blur(rgb, float(rng.uniform(0.1, 2.0)))
        images["rgb"] = rgb
    if maps is not None:
        return images, label, maps  # type: ignore[return-value]
    return images, label


@dataclass
class Targets:
    """Cached teacher targets held in memory, row-aligned with a sample list."""

    visual: np.ndarray  # (N, M, D) float32
    scene: np.ndarray  # (N, D)
    classes: np.ndarray  # (K, D)
    codes: np.ndarray | None = None  # (N, M, g, g) uint16 teacher patch codes (not CodeAlign)
    code_image_size: int = 224  # the teacher's input size the code grid covers


class StudentData(torch.utils.data.Dataset):
    """Item key (epoch, index[, step]) -> one sample's tensors; epoch -1 means no
    augmentation. With `single_modality`, a training item shows exactly one modality, drawn
    from (seed, step, index) (`codes.isolated_modality`); with cached codes, a training
    item carries them per pixel (`codes`, (M, crop, crop), -1 where none).

    `transform` (an evaluation protocol's resize) acts on the stored arrays and label
    before anything else, as the official val transforms act on the decoded tensors."""

    def __init__(self, samples: SampleSequence, modalities: Sequence[str],
                 targets: Targets | None, crop: int | None, augment_cfg: AugmentConfig,
                 seed: int, modality_dropout: float = 0.0,
                 transform: Transform | None = None, single_modality: bool = False) -> None:
        self.samples = samples
        self.modalities = list(modalities)
        self.targets = targets
        self.crop = crop
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.modality_dropout = modality_dropout
        self.transform = transform
        self.single_modality = single_modality

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, ...]) -> dict[str, torch.Tensor]:
        from stages.student.code_targets import code_map, isolated_modality

        epoch, index = key[0], key[1]
        sample: Sample = self.samples[index]
        arrays = {m: sample.modalities[m] for m in self.modalities}
        label_arr = sample.label
        if self.transform is not None:
            arrays, label_arr = self.transform(arrays, label_arr)
        label = torch.from_numpy(np.ascontiguousarray(label_arr))
        present = torch.ones(len(self.modalities), dtype=torch.bool)
        maps = None
        training = epoch >= 0 and bool(self.crop)
        if not training:
            return self._item(model_input(arrays, self.modalities), label, present, index,
                              None)
        images = {m: to_unit(arrays[m]) for m in self.modalities}
        if self.targets is not None and self.targets.codes is not None:
            maps = code_map(self.targets.codes[index], *label.shape,
                            self.targets.code_image_size)
        rng = np.random.default_rng([self.seed, epoch, index])
        if maps is None:
            images, label = augment(images, label, self.crop, self.augment_cfg, rng)
        else:
            images, label, maps = augment(images, label, self.crop, self.augment_cfg, rng,
                                          maps)
        if self.modality_dropout and rng.random() < self.modality_dropout:
            k = int(rng.integers(1, len(self.modalities) + 1))
            keep = rng.choice(len(self.modalities), size=k, replace=False)
            present = torch.zeros_like(present)
            present[torch.from_numpy(keep)] = True
        if self.single_modality:
            if len(key) < 3:
                raise ValueError("isolated training needs (epoch, index, step) keys")
            present = torch.zeros_like(present)
            present[isolated_modality(self.seed, key[2], index, len(self.modalities))] = True
        first = images[self.modalities[0]]
        stacked = torch.empty((len(self.modalities), *first.shape), dtype=first.dtype)
        for i, m in enumerate(self.modalities):  # each modality straight into the batch item
            normalise(m, images[m], out=stacked[i])
        return self._item(stacked, label, present, index, maps)

    def _item(self, stacked: torch.Tensor, label: torch.Tensor, present: torch.Tensor,
              index: int, maps: torch.Tensor | None) -> dict[str, torch.Tensor]:
        item = {
            "images": stacked,
            "label": label.long(), "present": present, "index": torch.tensor(index),
        }
        if self.targets is not None:
            item["visual"] = torch.from_numpy(self.targets.visual[index])
            item["scene"] = torch.from_numpy(self.targets.scene[index])
        if maps is not None:
            item["codes"] = maps
        return item


class ScheduleSampler(torch.utils.data.Sampler):
    """Batches of (epoch, index, step) keys for steps `start`..`steps`-1: epoch e is the
    permutation `default_rng([seed, e])` of the samples, cut into full global batches of
    `batch_size`; rank r of `ranks` takes the r-th slice of each, so the schedule is the
    same whatever the number of ranks."""

    def __init__(self, n: int, batch_size: int, steps: int, seed: int, start: int = 0,
                 rank: int = 0, ranks: int = 1) -> None:
        self.n, self.batch_size, self.steps, self.seed, self.start = n, batch_size, steps, \
            seed, start
        self.per_epoch = max(1, n // batch_size)
        self.rank, self.local = rank, batch_size // ranks

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        order: np.ndarray | None = None
        epoch_of_order = -1
        for step in range(self.start, self.steps):
            epoch, pos = divmod(step, self.per_epoch)
            if epoch != epoch_of_order:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
                epoch_of_order = epoch
            assert order is not None
            chunk = order[pos * self.batch_size:(pos + 1) * self.batch_size]
            if len(chunk) < self.batch_size:  # fewer samples than one batch: wrap
                chunk = np.resize(order, self.batch_size)
            chunk = chunk[self.rank * self.local:(self.rank + 1) * self.local]
            yield [(epoch, int(i), step) for i in chunk]
