"""Spread over seeds: mean, sample standard deviation and a Student-t 95% interval of the mean, for one
arm's values and for paired differences (arm minus baseline, seed by seed: the same seed draws the same
initialisation and data order in both, so the difference removes what the seed alone moves)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

__all__ = ["Spread", "spread", "paired_difference"]


@dataclass(frozen=True, slots=True)
class Spread:
    n: int
    mean: float
    sd: float  # sample standard deviation (n - 1); NaN for one value
    low: float  # 95% interval of the mean: mean -/+ t(0.975, n - 1) sd / sqrt(n); NaN for one value
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies on one side of zero (for a difference: outside what seeds move)."""
        return math.isfinite(self.low) and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def spread(values: Sequence[float | None]) -> Spread:
    """Over the values that are there (None and NaN, a trial without that metric, are left out)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Spread(0, math.nan, math.nan, math.nan, math.nan)
    mean = sum(xs) / n
    if n == 1:
        return Spread(1, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return Spread(n, mean, sd, mean - half, mean + half)


def paired_difference(arm: Mapping[int, float | None], baseline: Mapping[int, float | None]) -> Spread:
    """Spread of arm[seed] - baseline[seed] over the seeds both have."""
    seeds = sorted(s for s in arm if s in baseline and arm[s] is not None and baseline[s] is not None)
    return spread([arm[s] - baseline[s] for s in seeds])  # type: ignore[operator]
