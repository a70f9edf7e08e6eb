"""A toy CodeAlign part for `stages.student.codealign.stages.run_steps`: a linear net over six
one-row batches with noise from the step's generator, so an interrupted or retrained part can
be compared weight for weight with an uninterrupted one in well under a second."""

from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch

from stages.student.codealign.config import CodeAlignConfig


class ToyPart(NamedTuple):
    cfg: CodeAlignConfig
    net: torch.nn.Linear
    init: dict[str, torch.Tensor]  # the net's weights before any step
    loader_at: Callable[[int], Iterator[dict]]
    step: Callable[[dict, torch.Generator], torch.Tensor]


def toy_part() -> ToyPart:
    """Checkpoints every 3 of the 6 steps; lr milestones at steps 2 and 4. The data are drawn
    before torch.manual_seed(0) (from the caller's random state), the net after it."""
    cfg = CodeAlignConfig(checkpoint_every=3, stage0_lr=0.01)  # milestones at steps 2, 4
    data = torch.randn(6, 4)

    def loader_at(start):
        return ({"x": data[i:i + 1]} for i in range(start, 6))

    def step(batch, gen):
        return (net(batch["x"]) + torch.rand(1, generator=gen)).square().mean()

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    return ToyPart(cfg, net, init, loader_at, step)
