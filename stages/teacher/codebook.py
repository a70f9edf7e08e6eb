"""Per-modality codebooks for dense teacher targets (teacher-code compression; not
CodeAlign, see docs/codealign.md).

Patch tokens are unit vectors in LanguageBind's joint space, so the codebook is fitted by
spherical mini-batch k-means: a token goes to the code with the largest dot product,
and each code moves towards the mean of its tokens with a per-code rate of 1 / (tokens
seen so far) (Sculley 2010), then is renormalised. Tokens arrive in batches (`fit`
takes an iterator), so a fit never holds more than one batch of patches plus the K x D
codebook. Everything is drawn from `numpy.random.default_rng(seed)` and the arithmetic
runs in float64, so a fit is a pure function of (tokens in order, K, seed, passes).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from any2seg.errors import PipelineError

CODE_DTYPE = np.uint16
MAX_K = int(np.iinfo(CODE_DTYPE).max)  # 65535: -1 is never a code (stage two ignores it)
_SPEC = re.compile(r"codebook:(?P<k>\d+)")
DENSE_FORMS = "codebook:K (K codes per modality, 2 <= K <= 65535; e.g. codebook:1024)"


def parse_dense(value: str) -> int:
    """`codebook:K` -> K; anything else raises (the caller names the key or flag)."""
    match = _SPEC.fullmatch(value.strip())
    if match is None or not 2 <= int(match["k"]) <= MAX_K:
        raise ValueError(DENSE_FORMS)
    return int(match["k"])


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def assign(tokens: np.ndarray, codebook: np.ndarray, block: int = 65536) -> np.ndarray:
    """(..., D) tokens -> (...) uint16 index of the code with the largest dot product
    (ties: the lowest index). Computed in float32 or wider, `block` tokens at a time."""
    dtype = np.promote_types(np.promote_types(tokens.dtype, codebook.dtype), np.float32)
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(dtype, copy=False)
    cb = codebook.astype(dtype, copy=False)
    out = np.empty(flat.shape[0], dtype=CODE_DTYPE)
    for i in range(0, flat.shape[0], block):
        out[i:i + block] = np.argmax(flat[i:i + block] @ cb.T, axis=1)
    return out.reshape(tokens.shape[:-1])


def decode(codes: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """(...) codes -> (..., D) code vectors."""
    return codebook[codes.astype(np.int64)]


@dataclass
class FitReport:
    tokens: int  # tokens seen over all passes
    passes: int
    empty_codes: int  # codes no token ever moved (kept at their initial token)


class SphericalKMeans:
    """Streaming spherical mini-batch k-means with a seeded, reservoir-drawn start.

    Driven batch by batch so several modalities fit in lockstep from one teacher pass:
    `init_update` over one pass (reservoir sampling of K tokens), then `update` over
    each k-means pass."""

    def __init__(self, k: int, seed: int = 0) -> None:
        if not 2 <= k <= MAX_K:
            raise ValueError(f"k must be in 2..{MAX_K}, got {k}")
        self.k, self.seed = k, seed
        self.rng = np.random.default_rng(seed)
        self.codebook: np.ndarray | None = None  # (K, D) float64, unit rows
        self.initialised = 0  # tokens seen by the reservoir
        self.counts = np.zeros(k, np.float64)
        self.tokens = 0

    def init_update(self, batch: np.ndarray) -> None:
        """Reservoir sampling (Algorithm R) of K tokens, one token at a time."""
        x = _unit(np.asarray(batch, np.float64).reshape(-1, batch.shape[-1]))
        if self.codebook is None:
            self.codebook = np.empty((self.k, x.shape[1]), np.float64)
        for row in x:
            if self.initialised < self.k:
                self.codebook[self.initialised] = row
            else:
                j = int(self.rng.integers(0, self.initialised + 1))
                if j < self.k:
                    self.codebook[j] = row
            self.initialised += 1

    def check_init(self) -> None:
        if self.initialised < self.k:
            raise PipelineError(f"the codebook needs at least K={self.k} patch tokens to fit, "
                                f"the fit subset has {self.initialised}; lower K (--dense "
                                "codebook:K) or fit on more samples (teacher.dense_fit_samples)")

    def update(self, batch: np.ndarray) -> None:
        """One mini-batch step: each code moves to its tokens' mean at rate n / count."""
        assert self.codebook is not None and self.initialised >= self.k, "initialise first"
        x = _unit(np.asarray(batch, np.float64).reshape(-1, batch.shape[-1]))
        idx = np.argmax(x @ self.codebook.T, axis=1)
        sums = np.zeros_like(self.codebook)
        np.add.at(sums, idx, x)
        n = np.bincount(idx, minlength=self.k).astype(np.float64)
        hit = n > 0
        self.counts[hit] += n[hit]
        rate = (n[hit] / self.counts[hit])[:, None]
        self.codebook[hit] = _unit((1 - rate) * self.codebook[hit]
                                   + rate * sums[hit] / n[hit][:, None])
        self.tokens += x.shape[0]

    def fit(self, batches: Callable[[], Iterator[np.ndarray]], passes: int = 2) -> FitReport:
        """`batches()` yields (n, D) token batches in a fixed order, once per call; it is
        called 1 + `passes` times (initialisation, then the k-means passes)."""
        for batch in batches():
            self.init_update(batch)
        self.check_init()
        for _ in range(passes):
            for batch in batches():
                self.update(batch)
        return self.report(passes)

    def report(self, passes: int) -> FitReport:
        return FitReport(self.tokens, passes, int((self.counts == 0).sum()))

    def float16(self) -> np.ndarray:
        """The codebook as stored (float16); codes are always assigned against this."""
        assert self.codebook is not None, "fit first"
        return self.codebook.astype(np.float16)


def reconstruction_cosine(batches: Iterable[np.ndarray], codebook: np.ndarray) -> float:
    """Mean cosine between tokens and their code vectors (the stored float16 codebook)."""
    total, n = 0.0, 0
    cb = codebook.astype(np.float64)
    cb_unit = _unit(cb)
    for batch in batches:
        x = _unit(np.asarray(batch, np.float64).reshape(-1, batch.shape[-1]))
        codes = assign(x, codebook)
        total += float((x * cb_unit[codes.astype(np.int64)]).sum())
        n += x.shape[0]
    return total / n if n else float("nan")


def batched(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
