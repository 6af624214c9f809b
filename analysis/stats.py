"""The statistics of the report: 95 % intervals that fit a coupled, repeated design.

- Means over **repetitions**: the unit is one repetition of one point (a run folder's `rep`;
  two run folders pooled give two units per rep). Each unit's value is the mean over its
  requests (prompts); the interval is Student's t over the unit values (n - 1 degrees of
  freedom), cut at the range of the quantity (a time is never below 0). One unit: no
  interval (NaN).
- **Fractions** (acceptance = accepted / drafted, identical sequences): Wilson score
  intervals over the pooled counts, which never leave [0, 1].
- **Paired ratios** (speedup of a configuration over a baseline on the same prompt, seed,
  repetition and settings): the geometric mean of the per-pair ratios with a t interval on
  their logarithms, back-transformed (always > 0).
- **Paired differences** (fidelity: lossy minus full on the same prompt and seed): t interval
  over the pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = [
    "LEVEL",
    "geometric_interval",
    "t_interval",
    "unit_means",
    "wilson",
]

LEVEL = 0.95
"""Confidence level of every interval."""
_Z = float(_st.norm.ppf(0.5 + LEVEL / 2))


def t_interval(
    values: Sequence[float] | np.ndarray | pd.Series,
    lower: float = -math.inf,
    upper: float = math.inf,
) -> tuple[float, float, float, int]:
    """(mean, ci_low, ci_high, n) of the finite values; NaN bounds for n < 2; sd 0 gives a
    zero-width interval; the bounds are cut to [lower, upper], the quantity's range."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = float(x.mean())
    if n < 2:
        return m, math.nan, math.nan, n
    half = float(_st.t.ppf(0.5 + LEVEL / 2, n - 1)) * float(x.std(ddof=1)) / math.sqrt(n)
    return m, max(min(lower, m), m - half), min(max(upper, m), m + half), n


def geometric_interval(
    ratios: Sequence[float] | np.ndarray | pd.Series,
) -> tuple[float, float, float, int]:
    """(geometric mean, ci_low, ci_high, n) of positive ratios: t interval on log ratios."""
    x = np.asarray(ratios, dtype=float)
    x = x[np.isfinite(x) & (x > 0)]
    m, lo, hi, n = t_interval(np.log(x))
    return math.exp(m) if n else math.nan, math.exp(lo), math.exp(hi), n


def wilson(successes: float, trials: float) -> tuple[float, float, float]:
    """(fraction, ci_low, ci_high): the Wilson score interval; NaN for 0 trials."""
    if not trials or trials <= 0:
        return math.nan, math.nan, math.nan
    p = successes / trials
    z2 = _Z * _Z
    den = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / den
    half = _Z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / den
    return p, max(0.0, centre - half), min(1.0, centre + half)


def unit_means(
    df: pd.DataFrame,
    keys: Sequence[str],
    value: str,
    units: Sequence[str] = ("run", "rep"),
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> pd.DataFrame:
    """Per group of `keys`: mean, ci_low, ci_high (t, cut to `bounds`) over the units' means
    of `value`, the number of units n and of observations n_obs (rows with a finite value)."""
    cols = [*keys, "mean", "ci_low", "ci_high", "n", "n_obs"]
    d = df[[*keys, *units, value]].copy()
    d[value] = pd.to_numeric(d[value], errors="coerce").astype(float)
    d = d[np.isfinite(d[value])]
    if d.empty:
        return pd.DataFrame(columns=cols)
    per_unit = d.groupby([*keys, *units], dropna=False, sort=False)[value].agg(["mean", "size"])
    rows = []
    for key, g in per_unit.groupby(level=list(range(len(keys))), dropna=False, sort=False):
        m, lo, hi, n = t_interval(g["mean"].to_numpy(), *bounds)
        key_t = key if isinstance(key, tuple) else (key,)
        rows.append((*key_t, m, lo, hi, n, int(g["size"].sum())))
    return pd.DataFrame(rows, columns=cols)
