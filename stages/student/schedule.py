"""Stage two's learning-rate schedule: linear warm-up from `warmup_lr_init`, then
polynomial decay to 0 over the run (the authors' DELIVER recipe: warm-up over 5 % of the
steps from 0.1 x the peak, power 0.9).

The numbers are timm's `PolyLRScheduler(t_initial=steps, power, warmup_t, warmup_lr_init,
t_in_epochs=False)`, the same floating-point expressions in the same order (tests/
student/test_lr_schedule.py compares the two step by step); it lives here so that a MiT training,
which otherwise needs no timm, does not pay timm's import (about 3 s of CPU) at every start.
"""

from __future__ import annotations

import torch


class PolyWarmup:
    """Sets every parameter group's `lr` for optimiser step `t` (`step_update(t)`, called
    before the step); each group's peak is its `initial_lr`, recorded once (as timm does,
    so a checkpoint's optimiser state is the same)."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int, power: float,
                 warmup_steps: int = 0, warmup_lr_init: float = 0.0) -> None:
        if steps < 1:
            raise ValueError(f"a schedule needs at least one step, got {steps}")
        self.optimizer, self.steps, self.power = optimizer, steps, power
        self.warmup_steps, self.warmup_lr_init = warmup_steps, warmup_lr_init
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base = [group["initial_lr"] for group in optimizer.param_groups]
        self.slopes = [(v - warmup_lr_init) / warmup_steps for v in self.base] \
            if warmup_steps else []
        if warmup_steps:
            self._set([warmup_lr_init] * len(self.base))

    def lrs(self, t: int) -> list[float]:
        """The learning rate of each group at step `t` (0-based)."""
        if t < self.warmup_steps:
            return [self.warmup_lr_init + t * s for s in self.slopes]
        if t >= self.steps:  # past the end (timm: past its one cycle, lr_min)
            return [0.0 for _ in self.base]
        return [0.0 + (peak - 0.0) * (1 - t ** 1.0 / self.steps ** 1.0) ** self.power
                for peak in self.base]

    def step_update(self, t: int) -> None:
        self._set(self.lrs(t))

    def _set(self, values: list[float]) -> None:
        for group, value in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = value
