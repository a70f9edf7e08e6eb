"""Dropout and stochastic depth drawn from per-sample keys instead of an RNG stream.

torch's dropout layers draw one batch's masks from the process's RNG, so the mask a
sample gets depends on the batch it shares and, under data parallelism, on its rank.
Here every sample of a training step carries a key made from (seed, step, position in
the global batch), and each mask element is a hash of (key, layer, element): a sample
gets the same masks at the same step whether it is trained by one process with batch B
or by N ranks with B/N each, and a resumed run draws what an uninterrupted one drew.
Without keys (a model called outside the training loop) the layers behave as torch's.

The hash is a 32-bit integer mixer (lowbias32, C. Wellons) evaluated in int64 tensor
arithmetic that never overflows, so it gives the same bits on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_MASK = 0xFFFFFFFF
_CURRENT: list[torch.Tensor | None] = [None]


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32, through 16-bit halves of c (no int64 overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(key: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """A new key from `key` and `value` (broadcasting), in [0, 2**32)."""
    value = torch.as_tensor(value, dtype=torch.int64, device=key.device)
    return _mix(key ^ _mix((value + 0x9E3779B9) & _MASK))


def sample_keys(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """Keys of the samples at `positions` of the global batch of `step` (int64, (B,)).
    The position, not the sample index, so that a sample repeated in a batch (a data set
    smaller than one batch) still gets two independent masks."""
    base = torch.tensor(seed & _MASK, dtype=torch.int64, device=positions.device)
    return combine(combine(_mix(base), step & _MASK), positions.to(torch.int64) & _MASK)


def row_keys(keys: torch.Tensor, modalities: int) -> torch.Tensor:
    """Keys of the (sample, modality) rows the shared encoder sees: (B * M,)."""
    arange = torch.arange(modalities, device=keys.device)
    return combine(keys[:, None], arange[None] + 1).flatten()


def uniform(keys: torch.Tensor, salt: int, n: int) -> torch.Tensor:
    """(R, n) float32 uniforms in [0, 1) for R keys: element j of row r from (key_r, salt, j)."""
    arange = torch.arange(n, device=keys.device)
    bits = combine(combine(keys, salt)[:, None], arange[None])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


@contextmanager
def using(keys: torch.Tensor | None) -> Iterator[None]:
    """Keys (one per batch row) for the keyed layers called inside the block."""
    previous = _CURRENT[0]
    _CURRENT[0] = keys
    try:
        yield
    finally:
        _CURRENT[0] = previous


def current() -> torch.Tensor | None:
    return _CURRENT[0]


def _keys_for(x: torch.Tensor) -> torch.Tensor | None:
    keys = _CURRENT[0]
    if keys is not None and keys.shape[0] != x.shape[0]:
        raise RuntimeError(f"noise keys for {keys.shape[0]} rows, but the input has "
                           f"{x.shape[0]}")
    return keys


def keyed_keep(x: torch.Tensor, p: float, salt: int, dims: int) -> torch.Tensor | None:
    """Boolean keep mask over the first `dims` axes of x (1: rows, 2: channels, x.dim():
    elements), broadcastable to x, drawn from the current keys; None outside `using`."""
    keys = _keys_for(x)
    if keys is None:
        return None
    shape = tuple(x.shape[:dims])
    keep = uniform(keys, salt, math.prod(shape[1:])).view(shape) >= p
    return keep.view(*shape, *([1] * (x.dim() - dims)))


class KeyedDropout(nn.Module):
    """Dropout of elements (`channels=False`) or of whole channels (Dropout2d)."""

    def __init__(self, p: float, channels: bool, salt: int) -> None:
        super().__init__()
        self.p, self.channels, self.salt = p, channels, salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = keyed_keep(x, self.p, self.salt, 2 if self.channels else x.dim())
        if keep is None:
            fallback = nn.functional.dropout2d if self.channels else nn.functional.dropout
            return fallback(x, self.p, True)
        return x * keep.to(x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, channels={self.channels}, salt={self.salt}"


class KeyedDropPath(nn.Module):
    """Stochastic depth: a whole row (sample) of a residual branch dropped with prob p."""

    def __init__(self, p: float, salt: int, scale_by_keep: bool = True) -> None:
        super().__init__()
        self.p, self.salt, self.scale_by_keep = p, salt, scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = keyed_keep(x, self.p, self.salt, 1)
        if keep is None:
            u = torch.rand(x.shape[0], device=x.device)
            keep = (u >= self.p).view(-1, *([1] * (x.dim() - 1)))
        keep = keep.to(x.dtype)
        return x * keep / (1 - self.p) if self.scale_by_keep else x * keep

    def extra_repr(self) -> str:
        return f"p={self.p}, salt={self.salt}"


_DROP_PATHS = ("DropPath", "MiTDropPath", "SegformerDropPath")  # timm, ours, transformers


def make_keyed(model: nn.Module) -> nn.Module:
    """Replace torch's Dropout / Dropout2d and the DropPath layers (timm's, the MiT's,
    transformers') of `model` by their keyed versions, each with its own salt (its order in
    the model)."""
    salt = 0

    def replace(module: nn.Module) -> None:
        nonlocal salt
        for name, child in module.named_children():
            keyed: nn.Module | None = None
            if isinstance(child, nn.Dropout2d) and child.p > 0:
                keyed = KeyedDropout(child.p, True, salt)
            elif isinstance(child, nn.Dropout) and child.p > 0:
                keyed = KeyedDropout(child.p, False, salt)
            elif type(child).__name__ in _DROP_PATHS:
                p = float(getattr(child, "drop_prob", 0.0) or 0.0)
                keyed = KeyedDropPath(p, salt, bool(getattr(child, "scale_by_keep", True)))
            if keyed is not None:
                keyed.train(child.training)
                module.add_module(name, keyed)
                salt += 1
            else:
                replace(child)

    replace(model)
    return model
