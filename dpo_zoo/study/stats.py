"""The statistics of the study's verdicts: Student's t distribution, the paired t test, the two one-sided
tests of equivalence (TOST), Holm's step-down correction and the number of seeds a test would need.

Written out here (numpy only) rather than taken from scipy, which the project does not depend on.

* Student's t CDF: ``F(t; ν) = 1 − ½ I_{ν/(ν+t²)}(ν/2, ½)`` for t ≥ 0 (and ``1 − F(−t)`` below 0), with
  ``I_x(a, b)`` the regularized incomplete beta function, evaluated by its continued fraction (Lentz's
  method; Press et al., *Numerical Recipes*, §6.4); the quantile by bisection on the CDF.
* Paired test of ``H0: μ = 0`` on the per-seed differences ``d_1..d_n``: ``t = d̄ / (s/√n)``, two-sided
  ``p = 2(1 − F(|t|; n−1))``.
* TOST (Schuirmann 1987) of ``H0: |μ| ≥ δ``: ``p = max(1 − F((d̄+δ)/se), F((d̄−δ)/se))``; a small p means
  the effect lies within ``±δ`` ("equivalent"). It rejects at level α exactly when the ``1 − 2α`` t
  interval lies inside ``(−δ, δ)``.
* Holm (1979): sort the m p-values ascending; the i-th (from 0) is adjusted to
  ``max_{j ≤ i} min(1, (m − j)·p_(j))``; rejecting the adjusted p-values below α controls the
  family-wise error rate at α under any dependence between the tests.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function ``I_x(a, b)`` for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # the continued fraction converges fast on this side
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """``P(T ≤ t)`` for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf` to 1e-10)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < q:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < q:
            low = mid
        else:
            high = mid
        if high - low < 1e-10:
            break
    return 0.5 * (low + high)


def paired(values: Sequence[float], margin: Optional[float] = None) -> Dict[str, float]:
    """Summary and tests of per-seed paired differences: ``mean``, ``sd``, ``n``, ``se``, ``ci95`` (half-width
    of the 95% t interval), ``p`` (two-sided, H0: μ = 0) and, with an equivalence ``margin`` δ > 0,
    ``p_equivalent`` (TOST, H0: |μ| ≥ δ). With no spread (sd = 0, e.g. two losses that are the same
    function), a zero mean gives p = 1 and p_equivalent = 0, a non-zero one p = 0."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    n = int(v.size)
    out: Dict[str, float] = {"mean": float(v.mean()) if n else math.nan, "n": n, "sd": math.nan, "se": math.nan,
                             "ci95": math.nan, "p": math.nan, "p_equivalent": math.nan}
    if n < 2:
        return out
    mean, sd = float(v.mean()), float(v.std(ddof=1))
    se = sd / math.sqrt(n)
    out.update(sd=sd, se=se, ci95=t_ppf(0.975, n - 1) * se)
    if se == 0.0:
        out["p"] = 1.0 if mean == 0.0 else 0.0
        if margin is not None:
            out["p_equivalent"] = 0.0 if abs(mean) < margin else 1.0
        return out
    out["p"] = 2.0 * (1.0 - t_cdf(abs(mean) / se, n - 1))
    if margin is not None:
        out["p_equivalent"] = max(1.0 - t_cdf((mean + margin) / se, n - 1), t_cdf((mean - margin) / se, n - 1))
    return out


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm-adjusted p-values, in the order given (NaNs stay NaN and do not count in the family)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def seeds_needed(mean: float, sd: float, alpha: float, margin: Optional[float] = None,
                 most: int = 10_000) -> Dict[str, Optional[int]]:
    """Paired seeds at which the observed effect would be decided, if the mean and SD stayed as observed:
    ``difference``: the least n with ``t_{1−α/2}(n−1)·sd/√n < |mean|``; ``equivalence``: the least n with
    ``t_{1−α}(n−1)·sd/√n < δ − |mean|`` (only when |mean| < δ). None when not within ``most`` seeds
    (or not possible). ``alpha`` is the level the test must pass: Holm's strictest, α/m, for a family of m."""
    if math.isnan(mean) or math.isnan(sd):
        return {"difference": None, "equivalence": None}

    def least(width: float, one_sided: bool) -> Optional[int]:
        if width <= 0:
            return None
        if sd == 0:
            return 3
        level = 1.0 - alpha if one_sided else 1.0 - alpha / 2.0
        n_low, n_high = 3, most
        if t_ppf(level, n_high - 1) * sd / math.sqrt(n_high) >= width:
            return None
        while n_low < n_high:  # the half-width falls with n: bisect for the first n below the width
            mid = (n_low + n_high) // 2
            if t_ppf(level, mid - 1) * sd / math.sqrt(mid) < width:
                n_high = mid
            else:
                n_low = mid + 1
        return n_low

    return {"difference": least(abs(mean), False) if mean != 0 else None,
            "equivalence": least(margin - abs(mean), True) if margin is not None else None}
