"""Bilinear resizing whose bits do not depend on torch's thread count.

torch's CPU bilinear resize (align_corners=False, no antialiasing) of a float image picks
its kernel by the thread count: a 3-channel image goes through the channels-last kernel
on one thread and through the generic kernel on more (`upsample_bilinear2d_kernel_impl_
float` in ATen's UpSampleKernel.cpp, "benchmarks showed that with only 1 thread, images
(C == 3) were slightly faster with the vectorized kernel"). The two round differently in
the last bit, so the same item came out of a DataLoader worker (one thread) and out of
the main process (`train.workers: 0`, several threads) with other numbers, and the two
trained other weights.

`resize_bilinear` always takes the channels-last kernel for 3-channel float32 images: a
fourth, zero channel in channels-last layout selects it at any thread count (channels > 3),
and each output pixel's channels are still computed by its scalar loop (fewer channels
than one SIMD register of floats: 8 or 16 on x86), so the numbers are those of one thread
- what the official DELIVER loaders, whose transforms run in worker processes, compute.
On one thread on x86 torch's own call already is that kernel, and runs without the copies.
Other channel counts already take one kernel whatever the thread count; other dtypes
with 3 channels are resized one channel at a time (the generic kernel, at any count).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

# where a SIMD register holds more than 4 floats, so a 4th channel keeps the scalar loop
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def resize_bilinear(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.interpolate(x, (height, width), mode="bilinear", align_corners=False)` of an
    (N, C, H, W) tensor with the same bits at every torch thread count (for float32 and
    3 channels: torch's one-thread numbers). The result has `x`'s memory layout."""
    size = (height, width)
    if x.dim() != 4 or x.shape[1] != 3:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    n, _, h, w = x.shape
    layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
              and not x.is_contiguous() else torch.contiguous_format)
    if x.dtype != torch.float32:
        one = F.interpolate(x.reshape(n * 3, 1, h, w), size=size, mode="bilinear",
                            align_corners=False)
        return one.reshape(n, 3, height, width).contiguous(memory_format=layout)
    if torch.get_num_threads() == 1 and _X86:  # already that kernel: skip the copies
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    padded = torch.empty((n, 4, h, w), dtype=x.dtype, memory_format=torch.channels_last)
    padded[:, :3].copy_(x)
    padded[:, 3].zero_()
    out = F.interpolate(padded, size=size, mode="bilinear", align_corners=False)
    return out[:, :3].contiguous(memory_format=layout)
