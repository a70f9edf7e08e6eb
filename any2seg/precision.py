"""The one precision rule of the model code: upcast for stability, never down-cast.

`x.float()` turns float64 into float32, so a float64 check of a float64 model silently
measures float32 kernels (which differ between CPUs). Stable parts compute in
`promote_types(dtype, float32)`: float16/bfloat16 -> float32, float32 stays, float64 stays.
"""

from __future__ import annotations

import torch


def stable_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a numerically sensitive step of a `dtype` model computes in."""
    return torch.promote_types(dtype, torch.float32)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """`x` in its stable dtype (a no-op for float32 and float64)."""
    return x.to(stable_dtype(x.dtype))
