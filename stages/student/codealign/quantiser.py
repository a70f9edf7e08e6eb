"""A group's code space, as the official codebook module (opencood/models/sub_modules/
codebook.py, `UMGMQuantizer` with seg_num 1 and one level, built in
heter_codebook_shared_head.py with Linear layers of the feature width):

    z      = Linear(Linear(x))                        latent stage encoder, quantisation head
    logits = -||z - c_k||^2 / sqrt(K) * max(t, 1e-6)  t a learnable temperature (init 1)
    q      = hard Gumbel-softmax(logits, tau)          straight through: one-hot forward,
                                                       the soft sample's gradient backward
    x_hat  = Linear(Linear(q @ C))                    dequantisation head, restore head

No EMA, no k-means, no commitment loss: the codebook learns only through the task loss.
The codebook is initialised N(0, 2 / (5 D)) ("SmallInit"), as the official module.

At evaluation (`eval_sampling`, params `codealign.eval_quantiser`): `gumbel` samples the
hard Gumbel code as in training, as the official quantiser does in every mode
(`_multiCodebookQuantization._sample` calls `gumbelSoftmax` unconditionally, also for the
receiver's own group in heter_codebook_shared_head_c2c_infer.py), from the caller's
generator (the evaluation seeds it with `codealign.eval_seed`); `argmax` takes the most
likely code, deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6  # the official LowerBound on the temperature


def hard_gumbel(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One-hot samples over the last axis, straight-through (y_hard - y_soft.detach() +
    y_soft, the official `gumbelSoftmax`)."""
    eps = torch.finfo(logits.dtype).eps
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                   device=logits.device).clamp_(eps, 1 - eps)
    soft = ((logits - (-u.log()).log()) / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft)
    return hard - soft.detach() + soft


def one_hot_argmax(logits: torch.Tensor) -> torch.Tensor:
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits)


class Quantiser(nn.Module):
    """Channels-first maps (B, D, h, w) <-> per-cell codes of K codewords."""

    def __init__(self, dim: int, codes: int = 16, temperature: float = 1.0,
                 tau: float = 1.0, eval_sampling: str = "gumbel") -> None:
        super().__init__()
        if eval_sampling not in ("gumbel", "argmax"):
            raise ValueError(f"eval_sampling must be gumbel or argmax, got {eval_sampling!r}")
        self.dim, self.codes, self.tau = dim, codes, tau
        self.eval_sampling = eval_sampling
        self.latent = nn.Linear(dim, dim)
        self.quant_head = nn.Linear(dim, dim)
        self.dequant_head = nn.Linear(dim, dim)
        self.restore = nn.Linear(dim, dim)
        self.codebook = nn.Parameter(torch.randn(codes, dim) * math.sqrt(2 / (5 * dim)))
        self.temperature = nn.Parameter(torch.full((1,), float(temperature)))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w, K) code logits."""
        z = self.quant_head(self.latent(x.permute(0, 2, 3, 1)))
        dist = (z * z).sum(-1, keepdim=True) + (self.codebook ** 2).sum(-1) \
            - 2 * z @ self.codebook.t()
        return -dist / math.sqrt(self.codes) * self.temperature.clamp_min(EPS)

    def sample(self, logits: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """Hard Gumbel one-hot in training; at evaluation per `eval_sampling`."""
        if self.training or self.eval_sampling == "gumbel":
            return hard_gumbel(logits, self.tau, generator)
        return one_hot_argmax(logits)

    def decode(self, onehot: torch.Tensor) -> torch.Tensor:
        """(B, h, w, K) one-hot (or soft) codes -> (B, D, h, w) features."""
        return self.restore(self.dequant_head(onehot @ self.codebook)).permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded features and the one-hot codes they come from."""
        onehot = self.sample(self.logits(x), generator)
        return self.decode(onehot), onehot
