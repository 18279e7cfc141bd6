"""Paired comparisons over seeds (benchmark.stats) and their section of results.md."""
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from glc_jax.benchmark import report, stats

# Baseline scores vary a lot between seeds (0.40 … 0.70) while the init is ahead
# of it on every seed by 2, 4, 3, 5, 1 points: paired, that is decisive; unpaired
# (two independent samples) it is lost in the seed-to-seed spread.
BASE = [0.40, 0.60, 0.50, 0.70, 0.45]
GAIN = [0.02, 0.04, 0.03, 0.05, 0.01]


def _row(init, fraction, seed, oa, **extra):
  return {"init": init, "fraction": fraction, "seed": seed, "overall_accuracy": oa, **extra}


def _rows(init_scores, base_scores, init="glcnet", base="random", fraction=0.05, key="overall_accuracy"):
  """Rows for seeds 0, 1, …; None leaves that seed's row out."""
  rows = []
  for name, scores in ((init, init_scores), (base, base_scores)):
    rows += [{"init": name, "fraction": fraction, "seed": s, key: v}
             for s, v in enumerate(scores) if v is not None]
  return rows


def test_paired_interval_matches_hand_arithmetic_and_scipy():
  init = [b + g for b, g in zip(BASE, GAIN)]
  # By hand: d = 2, 4, 3, 5, 1 points; mean 3; squared deviations 1+1+0+4+4 = 10,
  # sd² = 10/4 = 2.5; se = √(2.5/5) = √0.5 = 0.7071; t_{0.975,4} = 2.776 (t table);
  # half width 2.776 · 0.7071 = 1.963 → [1.037, 4.963] points.
  got = stats.paired_difference(_rows(init, BASE), "overall_accuracy", "glcnet", "random", 0.05)
  assert got.seeds == (0, 1, 2, 3, 4)
  assert 100 * got.mean == pytest.approx(3.0, abs=1e-9)
  assert 100 * got.low == pytest.approx(3.0 - 1.963, abs=1e-3)
  assert 100 * got.high == pytest.approx(3.0 + 1.963, abs=1e-3)
  assert got.verdict == "better"
  scipy_ci = scipy_stats.ttest_rel(init, BASE).confidence_interval(0.95)
  assert (got.low, got.high) == pytest.approx((scipy_ci.low, scipy_ci.high), abs=1e-12)
  # The same numbers as independent samples do not separate: pairing is what decides.
  unpaired = scipy_stats.ttest_ind(init, BASE).confidence_interval(0.95)
  assert unpaired.low < 0 < unpaired.high


def test_paired_t_interval_at_other_confidence_uses_the_t_quantile():
  # d = 1, 2, 3: mean 2, sd 1, se 1/√3; t_{0.95,2} = 2.920 (t table) → 2 ± 1.686.
  mean, low, high = stats.paired_t_interval([0.01, 0.02, 0.03], confidence=0.90)
  assert (100 * mean, 100 * low, 100 * high) == pytest.approx((2.0, 2.0 - 1.686, 2.0 + 1.686), abs=1e-3)
  with pytest.raises(ValueError, match="at least 2"):
    stats.paired_t_interval([0.01])


@pytest.mark.parametrize("low, high, n, expected", [
    (0.001, 0.05, 5, "better"),
    (-0.05, -0.001, 5, "worse"),
    (-0.01, 0.02, 5, "not distinguishable at n=5"),
    (0.0, 0.02, 3, "not distinguishable at n=3"),  # touching 0 is not above it
    (-0.02, 0.0, 3, "not distinguishable at n=3"),
    (math.nan, math.nan, 1, "n too small"),
    (math.nan, math.nan, 4, "no spread at n=4"),
])
def test_verdict_rules(low, high, n, expected):
  assert stats.verdict(low, high, n) == expected


def test_worse_and_undecided_cells():
  worse = stats.paired_difference(_rows([b - g for b, g in zip(BASE, GAIN)], BASE),
                                  "overall_accuracy", "glcnet", "random", 0.05)
  assert worse.verdict == "worse" and 100 * worse.high == pytest.approx(-3.0 + 1.963, abs=1e-3)
  # d = +2, −1, +3, −2, +1 points: mean 0.6, the interval straddles 0.
  mixed = [b + g for b, g in zip(BASE, [0.02, -0.01, 0.03, -0.02, 0.01])]
  undecided = stats.paired_difference(_rows(mixed, BASE), "overall_accuracy", "glcnet", "random", 0.05)
  assert undecided.verdict == "not distinguishable at n=5"
  assert undecided.low < 0 < undecided.high


def test_pairs_by_seed_and_counts_only_complete_pairs():
  # glcnet finished seeds 0-4, random seeds 0-3 and 5: only seeds 0-3 pair.
  init = [0.42, 0.64, 0.53, 0.75, 0.46, None]
  base = [0.40, 0.60, 0.50, 0.70, None, 0.10]
  got = stats.paired_difference(_rows(init, base), "overall_accuracy", "glcnet", "random", 0.05)
  # By hand over seeds 0-3: d = 2, 4, 3, 5; mean 3.5; squared deviations
  # 2.25+0.25+0.25+2.25 = 5, sd² = 5/3; se = √(5/3/4) = 0.6455; t_{0.975,3} = 3.182
  # → 3.5 ± 2.054.
  assert got.seeds == (0, 1, 2, 3) and got.n == 4
  assert (100 * got.low, 100 * got.high) == pytest.approx((3.5 - 2.054, 3.5 + 2.054), abs=1e-3)
  assert got.verdict == "better"


def test_nan_scores_drop_their_seed():
  init = [0.42, math.nan, 0.53, 0.75]
  got = stats.paired_difference(_rows(init, BASE[:4]), "overall_accuracy", "glcnet", "random", 0.05)
  assert got.seeds == (0, 2, 3)
  # d = 2, 3, 5: mean 10/3 points.
  assert 100 * got.mean == pytest.approx(10 / 3)


def test_fewer_than_two_pairs_give_no_interval():
  one = stats.paired_difference(_rows([0.42, None], [0.40, 0.60]), "overall_accuracy",
                                "glcnet", "random", 0.05)
  assert one.n == 1 and one.verdict == "n too small" and math.isnan(one.low)
  assert 100 * one.mean == pytest.approx(2.0)
  none = stats.paired_difference(_rows([0.42], [None, 0.6]), "overall_accuracy",
                                 "glcnet", "random", 0.05)
  assert none.n == 0 and none.verdict == "no paired seeds" and math.isnan(none.mean)


def test_equal_differences_on_every_seed_give_no_interval():
  # 0.3 − 0.1 and 0.6 − 0.4 differ in the last bit, so scipy reports a
  # ~1e-16-wide interval (t ≈ 1e16); the same difference on every seed is no
  # evidence of certainty, and must not read "better".
  init, base = [0.3, 0.6, 0.5], [0.1, 0.4, 0.3]
  got = stats.paired_difference(_rows(init, base), "overall_accuracy", "glcnet", "random", 0.05)
  assert got.verdict == "no spread at n=3"
  assert math.isnan(got.low) and 100 * got.mean == pytest.approx(20.0)
  same = stats.paired_difference(_rows(base, base), "overall_accuracy", "glcnet", "random", 0.05)
  assert same.verdict == "no spread at n=3" and same.mean == 0.0


def test_duplicate_rows_are_an_error():
  rows = _rows([0.42, 0.64], [0.40, 0.60]) + [_row("glcnet", 0.05, 1, 0.5)]
  with pytest.raises(ValueError, match="two rows for init 'glcnet', fraction 0.05, seed 1"):
    stats.paired_difference(rows, "overall_accuracy", "glcnet", "random", 0.05)


def test_comparisons_against_the_baselines_present():
  assert stats.comparisons(["glcnet", "simclr", "random"]) == [
      ("glcnet", "random"), ("simclr", "random"), ("glcnet", "simclr")]
  assert stats.comparisons(["glcnet", "mocov2"]) == []


def _report_rows():
  """glcnet, simclr, random at 5% over seeds 0-4 (simclr lacks seed 4), OA and tree IoU.

  OA: glcnet = random + GAIN (the hand-computed example above); simclr = random − 1
  point on seeds 0-3. Tree IoU: glcnet − random = +1, +3, +2, +4, +0 points. Kappa and
  mIoU follow OA (kappa = OA − 0.2, mIoU = OA / 2).
  """
  rows = []
  for s, b in enumerate(BASE):
    rows.append({"init": "random", "fraction": 0.05, "seed": s, "overall_accuracy": b,
                 "iou_tree": 0.10})
    rows.append({"init": "glcnet", "fraction": 0.05, "seed": s, "overall_accuracy": b + GAIN[s],
                 "iou_tree": 0.10 + GAIN[s] - 0.01})
    if s < 4:
      rows.append({"init": "simclr", "fraction": 0.05, "seed": s, "overall_accuracy": b - 0.01,
                   "iou_tree": math.nan})
  return [{**r, "kappa": r["overall_accuracy"] - 0.2, "miou": r["overall_accuracy"] / 2}
          for r in rows]


def test_paired_tables_in_results_md():
  rows = _report_rows()
  text = report.results_markdown(rows, ["glcnet", "simclr", "random"], [0.05], "T", "test")
  assert "## Paired differences against random and simclr" in text
  assert "scipy.stats.t.ppf" in text and "paired t interval" in text
  oa = text.split("### OA")[1].split("###")[0]
  # glcnet − random: 3 ± 1.963 (hand-computed above).
  assert "| glcnet − random | +3.00 [+1.04, +4.96] better |" in oa
  # simclr − random: −1 point on each of the 4 seeds simclr finished.
  assert "| simclr − random | −1.00 no spread at n=4 |" in oa
  # glcnet − simclr over seeds 0-3: d = 3, 5, 4, 6 points, i.e. the seeds-0-3 example
  # shifted by +1: 4.5 ± 2.054; 4 of the table's 5 pairs, so the cell says n.
  assert "| glcnet − simclr | +4.50 [+2.45, +6.55] better (n=4) |" in oa
  # mIoU = OA / 2 halves every difference and bound.
  assert "| glcnet − random | +1.50 [+0.52, +2.48] better |" in text.split("### mIoU")[1]
  per_class = text.split("### Per-class IoU")[1]
  # Tree: d = 1, 3, 2, 4, 0 = the OA differences − 1 → 2 ± 1.963; simclr's are all NaN.
  assert "| glcnet − random | 5% | +2.00 [+0.04, +3.96] better |" in per_class
  assert "| simclr − random | 5% | – |" in per_class


def test_no_paired_section_without_a_baseline():
  rows = [r for r in _report_rows() if r["init"] == "glcnet"]
  text = report.results_markdown(rows, ["glcnet"], [0.05], "T", "test")
  assert "Paired differences" not in text


def test_metric_plots_one_png_per_metric(tmp_path):
  paths = report.plot_metrics(_report_rows(), ["glcnet", "simclr", "random"], [0.05], tmp_path)
  assert [p.name for p in paths] == ["overall_accuracy.png", "kappa.png", "miou.png"]
  for p in paths:
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
