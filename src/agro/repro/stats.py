"""Statistics behind the verdicts: means with standard errors over seeds, paired differences with
t-intervals, accuracy at a matched KL, and the three-way decision rules.

Pure functions on lists of floats (no torch, no files), so the rules are tested directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# Two-sided 95 % Student-t quantiles t_{0.975, df}; df > 30 uses the normal 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
         17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064,
         25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}

# One-sided 95 % quantiles t_{0.95, df}: the 90 % two-sided interval of an equivalence test (TOST).
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860, 9: 1.833,
        10: 1.812, 11: 1.796, 12: 1.782, 13: 1.771, 14: 1.761, 15: 1.753, 16: 1.746, 17: 1.740,
        18: 1.734, 19: 1.729, 20: 1.725, 21: 1.721, 22: 1.717, 23: 1.714, 24: 1.711, 25: 1.708,
        26: 1.706, 27: 1.703, 28: 1.701, 29: 1.699, 30: 1.697}

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive at this scale"


def t975(df: int) -> float:
    """t_{0.975, df} (df > 30: the df = 30 value, slightly conservative)."""
    if df < 1:
        return math.inf
    return _T975.get(df, _T975[30])


def t95(df: int) -> float:
    """t_{0.95, df} (df > 30: the df = 30 value)."""
    if df < 1:
        return math.inf
    return _T95.get(df, _T95[30])


@dataclass(frozen=True)
class Estimate:
    """mean +- se over n values; (lo, hi) is the two-sided 95 % t-interval (infinite if n < 2)."""

    mean: float
    se: float
    n: int
    lo: float
    hi: float
    level: float = 0.95

    @property
    def interval(self) -> str:
        """"the 95% interval (lo .. hi)" (the level it was made at)."""
        return f"the {round(self.level * 100)}% interval ({self.lo:+.3f} .. {self.hi:+.3f})"

    def short(self, digits: int = 3) -> str:
        """"mean ± se" (no interval)."""
        if self.n == 0:
            return "n/a"
        return f"{self.mean:.{digits}f}" + (f" ± {self.se:.{digits}f}" if math.isfinite(self.se) else "")

    def fmt(self, digits: int = 3) -> str:
        if self.n == 0:
            return "n/a"
        ci = (f"[{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]" if math.isfinite(self.se)
              else "[no interval: one seed]")
        return (f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} ({round(self.level * 100)}% CI "
                f"{ci}, n={self.n})")


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean, standard error (sample sd / sqrt(n)) and two-sided t-interval of ``values`` at
    ``level`` 0.95 or 0.90 (the latter for equivalence: two one-sided 5 % tests). Non-finite
    values are dropped (``n`` says how many were used)."""
    if level not in (0.95, 0.90):
        raise ValueError(f"level must be 0.95 or 0.90, got {level}")
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan, level)
    m = sum(v) / n
    if n < 2:
        return Estimate(m, math.inf, 1, -math.inf, math.inf, level)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    se = sd / math.sqrt(n)
    h = (t975 if level == 0.95 else t95)(n - 1) * se
    return Estimate(m, se, n, m - h, m + h, level)


def paired(a: dict, b: dict, level: float = 0.95) -> Estimate:
    """Paired difference a - b over the seeds both have ({seed: value} each)."""
    seeds = sorted(set(a) & set(b))
    return estimate([a[s] - b[s] for s in seeds], level)


def superiority(d: Estimate, margin: float) -> tuple[str, str]:
    """Verdict on "A > B" from the paired difference d = A - B: reproduced when the 95 % interval
    is above 0; not reproduced when it is below 0, or inside (-margin, margin) (no difference worth
    the name); inconclusive otherwise (the interval straddles 0 and is wider than the margin)."""
    if d.n < 2:
        return INCONCLUSIVE, "fewer than two seeds: no interval"
    if d.lo > 0:
        return REPRODUCED, f"the 95% interval of the difference lies above 0 ({d.lo:+.3f} .. {d.hi:+.3f})"
    if d.hi < 0:
        return NOT_REPRODUCED, f"the difference is significantly negative ({d.lo:+.3f} .. {d.hi:+.3f})"
    if -margin < d.lo and d.hi < margin:
        return NOT_REPRODUCED, (f"the 95% interval ({d.lo:+.3f} .. {d.hi:+.3f}) lies inside "
                                f"+-{margin}: no difference of that size")
    return INCONCLUSIVE, (f"the 95% interval ({d.lo:+.3f} .. {d.hi:+.3f}) contains 0 and is wider "
                          f"than +-{margin}")


def equivalence(d: Estimate, margin: float) -> tuple[str, str]:
    """Verdict on "A = B" from d = A - B, given at level 0.90 (TOST: two one-sided 5 % tests):
    reproduced when that interval lies inside (-margin, margin); not reproduced when it excludes 0;
    inconclusive otherwise, with the half-width the design could resolve."""
    if d.n < 2:
        return INCONCLUSIVE, "fewer than two seeds: no interval"
    iv = f"the 90% interval ({d.lo:+.3f} .. {d.hi:+.3f})"
    if -margin < d.lo and d.hi < margin:
        return REPRODUCED, f"{iv} lies inside +-{margin}"
    if d.lo > 0 or d.hi < 0:
        return NOT_REPRODUCED, f"{iv} excludes 0"
    return INCONCLUSIVE, (f"{iv} contains 0 but reaches outside +-{margin} (this design resolves "
                          f"+-{(d.hi - d.lo) / 2:.3f})")


def combine(*verdicts: str) -> str:
    """All parts reproduced -> reproduced; any part not reproduced -> not reproduced; else
    inconclusive."""
    if verdicts and all(v == REPRODUCED for v in verdicts):
        return REPRODUCED
    if any(v == NOT_REPRODUCED for v in verdicts):
        return NOT_REPRODUCED
    return INCONCLUSIVE


def interp_at(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y at x on the curve (xs, ys) taken in order of its points; the first
    crossing of x counts (KL curves need not be monotone). nan if the curve never reaches x."""
    pts = list(zip(xs, ys))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if min(x0, x1) <= x <= max(x0, x1):
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return math.nan


def mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else math.nan
