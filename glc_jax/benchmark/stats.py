"""Paired comparisons of two inits over seeds: mean difference, 95% paired t interval, verdict.

Two cells of the benchmark with the same label fraction and seed fine-tune on
the same labelled subset in the same data order, so the per-seed difference
d_s = score(init, s) − score(baseline, s) cancels what the seed does to both.
Over the n seeds that both inits finished with a finite score, the interval is
the paired t interval

    mean(d) ± t_{(1+c)/2, n−1} · sd(d) / √n,    sd with ddof=1,

its quantile from scipy.stats.t.ppf; it equals the interval of
scipy.stats.ttest_rel(init, baseline).confidence_interval(c). It assumes the
differences vary over seeds about normally, which a handful of seeds cannot
check.

Verdicts: "better" when the interval lies entirely above 0, "worse" when
entirely below, else "not distinguishable at n=K"; "n too small" below two
pairs (no interval). When every difference is the same (sd = 0, e.g. runs
that ignore the seed or identical scores) the interval collapses to a point.
That width measures no uncertainty, the t model's premise having failed, so
no interval is reported and the verdict is "no spread at n=K".
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
# The inits every other init is compared with, when the matrix has them.
BASELINES = ("random", "simclr")
# Differences that agree to within this (scores in fractions of 1) are equal:
# float rounding of equal differences is ~1e-16, one pixel of a test split ≫ 1e-12.
ZERO_SPREAD = 1e-12


@dataclasses.dataclass(frozen=True)
class PairedDifference:
  """init − baseline over the seeds both finished; in fractions of 1 like the scores.

  mean is NaN without pairs; low and high are NaN without an interval.
  """
  seeds: tuple[int, ...]
  mean: float
  low: float
  high: float
  verdict: str

  @property
  def n(self) -> int:
    return len(self.seeds)


def _scores_by_seed(rows: Sequence[Mapping], key: str, init: str, fraction: float) -> dict[int, float]:
  scores: dict[int, float] = {}
  for row in rows:
    if row["init"] != init or float(row["fraction"]) != fraction:
      continue
    seed = int(row["seed"])
    if seed in scores:
      raise ValueError(f"results: two rows for init {init!r}, fraction {fraction:g}, seed {seed}")
    value = row.get(key)
    scores[seed] = math.nan if value is None else float(value)
  return scores


def paired_scores(rows: Sequence[Mapping], key: str, init: str, baseline: str,
                  fraction: float) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
  """(seeds, init's scores, baseline's scores) over the seeds where both have a finite `key`.

  A seed that only one of the two finished, or with a NaN score (e.g. a class
  absent from the test split), is left out rather than paired with another seed.
  """
  a = _scores_by_seed(rows, key, init, float(fraction))
  b = _scores_by_seed(rows, key, baseline, float(fraction))
  seeds = tuple(sorted(s for s in a.keys() & b.keys() if math.isfinite(a[s]) and math.isfinite(b[s])))
  return (seeds, np.array([a[s] for s in seeds], np.float64),
          np.array([b[s] for s in seeds], np.float64))


def paired_t_interval(differences: Sequence[float],
                      confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """(mean, low, high) of the paired t interval of `differences` (n ≥ 2, finite)."""
  d = np.asarray(differences, np.float64)
  if d.size < 2:
    raise ValueError(f"a paired t interval needs at least 2 differences, got {d.size}")
  mean = float(d.mean())
  half = scipy_stats.t.ppf((1 + confidence) / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return mean, mean - float(half), mean + float(half)


def verdict(low: float, high: float, n: int) -> str:
  """The plain reading of an interval of n pairs; NaN bounds with n ≥ 2 mean the
  differences had no spread, so there is no interval to read."""
  if n < 2:
    return "n too small"
  if not (math.isfinite(low) and math.isfinite(high)):
    return f"no spread at n={n}"
  if low > 0:
    return "better"
  if high < 0:
    return "worse"
  return f"not distinguishable at n={n}"


def paired_difference(rows: Sequence[Mapping], key: str, init: str, baseline: str,
                      fraction: float, confidence: float = CONFIDENCE) -> PairedDifference:
  """init − baseline on `key` at `fraction`, paired by seed (see the module docstring)."""
  seeds, a, b = paired_scores(rows, key, init, baseline, fraction)
  d = a - b
  if d.size == 0:
    return PairedDifference(seeds, math.nan, math.nan, math.nan, "no paired seeds")
  if d.size < 2 or np.ptp(d) <= ZERO_SPREAD:
    return PairedDifference(seeds, float(d.mean()), math.nan, math.nan,
                            verdict(math.nan, math.nan, d.size))
  mean, low, high = paired_t_interval(d, confidence)
  return PairedDifference(seeds, mean, low, high, verdict(low, high, d.size))


def comparisons(inits: Sequence[str], baselines: Sequence[str] = BASELINES) -> list[tuple[str, str]]:
  """(init, baseline) pairs: every other init against each baseline present in `inits`.

  A baseline is not compared again with an earlier one (simclr − random says
  what random − simclr would, with the sign flipped).
  """
  present = [b for b in baselines if b in inits]
  return [(init, base) for k, base in enumerate(present) for init in inits
          if init != base and init not in present[:k]]
