"""Seed statistics for ablations: mean ± sample std per row, and the paired difference to
the baseline with a 95 % Student-t interval.

Rows share seeds (the same seed gives every row the same initial weights and batch order),
so the difference row - baseline is taken seed by seed: pairing removes the seed's own
effect, which on the generated sample is as large as the effects being measured. The t
quantile is computed exactly from the closed-form CDF of Student's t for an integer number
of degrees of freedom (Abramowitz & Stegun 26.7.3-4), so no scipy is needed.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

BETTER, WORSE, NOISE = "better", "worse", "inside the noise"


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with `df` (integer >= 1) degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:  # odd: (2/pi) [theta + sin(theta) (cos + 2/3 cos^3 + 2*4/(3*5) cos^5 ...)]
        series, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + s * series)
    series, term = 0.0, 1.0  # even: sin(theta) (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 ...)
    for k in range(1, df // 2 + 1):
        series += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * series


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = confidence (0.95 -> the 97.5 % quantile), by bisection on
    the exact CDF (to float precision)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    lo, hi = 0.0, 1.0
    while t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_mass(mid, df) < confidence:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return (lo + hi) / 2


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample (n - 1) standard deviation; std is NaN for a single value."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return statistics.fmean(values), std


@dataclass(frozen=True)
class Paired:
    """A row's difference to the baseline over the seeds both ran."""

    n: int
    mean: float
    std: float
    low: float
    high: float
    verdict: str


def paired(row: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
           ) -> Paired:
    """Per-seed differences row - baseline (same order: same seed), their mean, the
    `confidence` paired-t interval and the verdict: `better` when the whole interval is
    above 0, `worse` when below, else `inside the noise` (always so with one seed: no
    interval can be made)."""
    if len(row) != len(baseline):
        raise ValueError("paired values need one baseline value per seed")
    diffs = [float(a) - float(b) for a, b in zip(row, baseline, strict=True)]
    n = len(diffs)
    mean, std = mean_std(diffs)
    if n < 2:
        return Paired(n, mean, std, math.nan, math.nan, NOISE)
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    verdict = BETTER if low > 0 else WORSE if high < 0 else NOISE
    return Paired(n, mean, std, low, high, verdict)
