"""The benchmark's outputs: results.csv (one row per cell), results.md and plots.

Scores are reported in percent. Over seeds: the mean and the sample standard
deviation (ddof=1; '–' with a single seed). In each column of results.md the
best mean is in bold (all of them when they tie at the printed precision).
Paired differences against random init and SimCLR, with 95% paired t
intervals and verdicts, come from benchmark.stats.
"""
from __future__ import annotations

import csv
import math
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from glc_jax import files
from glc_jax.benchmark import stats

METRICS = (("overall_accuracy", "OA"), ("kappa", "Kappa"), ("miou", "mIoU"))
SCORE_FIELDS = ("overall_accuracy", "kappa", "miou", "mean_f1", "num_pixels")
# Where the fine-tuning run's best validation step fell (stages/finetune.py best_step.json).
FIT_FIELDS = ("best_step", "stopped_step", "planned_steps")
CSV_FIELDS = ("init", "fraction", "seed") + SCORE_FIELDS + FIT_FIELDS


def cell_row(init: str, fraction: float, seed: int, metrics: Mapping,
             fit: Mapping | None = None) -> dict:
  """One results.csv row from an evaluation's metrics.json (fractions of 1, not %) and the
  fine-tuning run's best_step.json (`fit`; None, NaN fields, for a run without one)."""
  row = {"init": init, "fraction": fraction, "seed": seed}
  for key in SCORE_FIELDS:
    value = metrics.get(key)
    row[key] = math.nan if value is None else value
  for key in FIT_FIELDS:
    value = (fit or {}).get(key)
    row[key] = math.nan if value is None else value
  for name, scores in metrics.get("per_class", {}).items():
    value = scores.get("iou")
    row[f"iou_{name}"] = math.nan if value is None else value
  return row


def write_csv(path: pathlib.Path, rows: Sequence[Mapping]) -> None:
  classes = dict.fromkeys(k for r in rows for k in r if k.startswith("iou_"))  # first-seen order
  fields = list(CSV_FIELDS) + list(classes)
  with files.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)


def read_csv(path: pathlib.Path) -> list[dict]:
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key, value in row.items():
      if key == "seed":
        row[key] = int(value)
      elif key != "init":
        row[key] = float(value) if value != "" else math.nan
  return rows


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """(mean, sample std) of the finite values; std is NaN for fewer than two."""
  x = np.asarray([v for v in values if math.isfinite(v)], np.float64)
  if x.size == 0:
    return math.nan, math.nan
  return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def aggregate(rows: Sequence[Mapping], key: str) -> dict[tuple[str, float], tuple[float, float, int]]:
  """(init, fraction) → (mean, std, number of seeds) of `key` over seeds."""
  groups: dict[tuple[str, float], list[float]] = {}
  for row in rows:
    groups.setdefault((row["init"], float(row["fraction"])), []).append(float(row[key]))
  return {k: (*mean_std(v), len(v)) for k, v in groups.items()}


def _fmt(mean: float, std: float) -> str:
  if not math.isfinite(mean):
    return "–"
  spread = f"{100 * std:.2f}" if math.isfinite(std) else "–"
  return f"{100 * mean:.2f} ± {spread}"


def _shown(mean: float) -> float:
  """The mean as printed (%, 2 decimals): equal-looking means tie for best."""
  return round(100 * mean, 2)


def _fraction_label(f: float) -> str:
  return f"{100 * f:g}%"


def probe_scores(histories: Mapping[tuple[str, int], Sequence[Mapping]], key: str = "probe_miou",
                 control: str = "random") -> dict[str, tuple[float, float, int]]:
  """init → (mean, std, seeds) of the online probe's score at the end of pretraining.

  histories: (method, seed) → that pretraining run's probe history
  (stages.probe.read_history). `control` gets the step-0 scores of every run:
  the probe on the never-trained network.
  """
  ends: dict[str, list[float]] = {}
  for (method, _), history in histories.items():
    if history:
      ends.setdefault(method, []).append(float(history[-1][key]))
      ends.setdefault(control, []).extend(float(h[key]) for h in history if h["step"] == 0)
  return {init: (*mean_std(v), len(v)) for init, v in ends.items() if v}


def metric_table(rows: Sequence[Mapping], key: str, inits: Sequence[str],
                 fractions: Sequence[float],
                 probe: Mapping[str, tuple[float, float, int]] | None = None) -> str:
  """Markdown: one row per init, one column per fraction, best mean per column bold.

  probe: init → (mean, std, seeds) of a first column, the online probe's score at
  the end of pretraining (probe_scores), when given.
  """
  agg = aggregate(rows, key)
  first = "probe (end of pretraining) | " if probe else ""
  header = "| init | " + first + " | ".join(_fraction_label(f) for f in fractions) + " |"
  lines = [header, "|---|" + "---|" * (len(fractions) + bool(probe))]
  best = {}
  for f in fractions:
    means = [_shown(agg[(i, f)][0]) for i in inits
             if (i, f) in agg and math.isfinite(agg[(i, f)][0])]
    best[f] = max(means) if means else None
  for init in inits:
    cells = []
    for f in fractions:
      if (init, f) not in agg:
        cells.append("")
        continue
      mean, std, _ = agg[(init, f)]
      text = _fmt(mean, std)
      cells.append(f"**{text}**" if best[f] is not None and _shown(mean) == best[f] else text)
    if probe:
      cells.insert(0, _fmt(*probe[init][:2]) if init in probe else "–")
    lines.append(f"| {init} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def per_class_table(rows: Sequence[Mapping], inits: Sequence[str], fractions: Sequence[float]) -> str:
  """Markdown: per-class IoU (mean over seeds, %) per init and fraction."""
  classes = [k for k in rows[0] if k.startswith("iou_")] if rows else []
  lines = ["| init | fraction | " + " | ".join(c[4:] for c in classes) + " |",
           "|---|---|" + "---|" * len(classes)]
  for init in inits:
    for f in fractions:
      picked = [r for r in rows if r["init"] == init and float(r["fraction"]) == f]
      if not picked:
        continue
      means = [mean_std([float(r[c]) for r in picked])[0] for c in classes]
      lines.append(f"| {init} | {_fraction_label(f)} | " +
                   " | ".join("–" if not math.isfinite(m) else f"{100 * m:.2f}" for m in means) + " |")
  return "\n".join(lines)


def _signed(x: float) -> str:
  """A difference in points with its sign, '−' for minus as in the text."""
  return f"{100 * x:+.2f}".replace("-", "−")


def paired_cell(diff: stats.PairedDifference, full_n: int) -> str:
  """'+3.10 [−1.20, +7.40] better'; the pair count joins verdicts that lack it when it is
  below `full_n` (seeds missing or NaN), '–' without pairs."""
  if diff.n == 0:
    return "–"
  text = _signed(diff.mean)
  if math.isfinite(diff.low):
    text += f" [{_signed(diff.low)}, {_signed(diff.high)}]"
  text += f" {diff.verdict}"
  return text + f" (n={diff.n})" if "n=" not in diff.verdict and diff.n < full_n else text


def _paired_lines(header: Sequence[str], labels: Sequence[str],
                  diffs: Sequence[Sequence[stats.PairedDifference]]) -> str:
  full_n = max((d.n for line in diffs for d in line), default=0)
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
  lines += [f"| {label} | " + " | ".join(paired_cell(d, full_n) for d in line) + " |"
            for label, line in zip(labels, diffs)]
  return "\n".join(lines)


def paired_table(rows: Sequence[Mapping], key: str, inits: Sequence[str],
                 fractions: Sequence[float]) -> str:
  """Markdown: one row per init − baseline (stats.comparisons), one column per fraction;
  '' when the matrix has no baseline."""
  pairs = stats.comparisons(inits)
  if not pairs:
    return ""
  return _paired_lines(["init − baseline"] + [_fraction_label(f) for f in fractions],
                       [f"{init} − {base}" for init, base in pairs],
                       [[stats.paired_difference(rows, key, init, base, f) for f in fractions]
                        for init, base in pairs])


def paired_class_table(rows: Sequence[Mapping], inits: Sequence[str],
                       fractions: Sequence[float]) -> str:
  """Markdown: per-class IoU differences, one row per init − baseline and fraction."""
  classes = [k for k in rows[0] if k.startswith("iou_")] if rows else []
  pairs = stats.comparisons(inits)
  if not pairs or not classes:
    return ""
  keys = [(init, base, f) for init, base in pairs for f in fractions]
  return _paired_lines(["init − baseline", "fraction"] + [c[4:] for c in classes],
                       [f"{init} − {base} | {_fraction_label(f)}" for init, base, f in keys],
                       [[stats.paired_difference(rows, c, init, base, f) for c in classes]
                        for init, base, f in keys])


def paired_section(rows: Sequence[Mapping], inits: Sequence[str], fractions: Sequence[float]) -> list[str]:
  """results.md's paired-difference section (method, tables), [] without a baseline."""
  pairs = stats.comparisons(inits)
  if not pairs:
    return []
  counts = sorted({stats.paired_difference(rows, "overall_accuracy", i, b, f).n
                   for i, b in pairs for f in fractions})
  parts = ["## Paired differences against " + " and ".join(
               b for b in stats.BASELINES if b in inits), "",
           "Each cell is init − baseline in points: the mean over the seeds that both "
           "finished with a finite score, paired by seed (the same seed fine-tunes on the "
           "same labelled subset in the same data order), then its 95% paired t interval, "
           "mean ± t(0.975, n−1)·sd/√n with sd the sample std (ddof=1) of the per-seed "
           "differences and the quantile from scipy.stats.t.ppf (the interval of "
           "scipy.stats.ttest_rel), then a verdict: better (interval above 0), worse "
           "(below 0), otherwise not distinguishable at n=K; n too small below two pairs; "
           "no spread when every seed gave the same difference (the interval would be a "
           "point, which measures no uncertainty, so none is shown). "
           f"Pairs per cell (OA): {', '.join(str(n) for n in counts)}; a cell with fewer "
           "pairs than the most says n. Many cells are read at once: at 95%, about one "
           "cell in twenty with no real difference still reads better or worse, and OA, "
           "Kappa and mIoU of the same runs are not independent evidence.", ""]
  for key, label in METRICS:
    parts += [f"### {label}", "", paired_table(rows, key, inits, fractions), ""]
  by_class = paired_class_table(rows, inits, fractions)
  if by_class:
    parts += ["### Per-class IoU", "", by_class, ""]
  return parts


def best_step_section(rows: Sequence[Mapping], inits: Sequence[str],
                      fractions: Sequence[float]) -> list[str]:
  """Markdown lines: where each fine-tuning run's best validation step fell ([] without records).

  A run whose best step is the step it stopped at (its last validation) is flagged: more
  steps might still have improved it, so its score is not that of a converged run.
  """
  known = [r for r in rows if math.isfinite(float(r.get("best_step", math.nan)))]
  if not known:
    return []
  lines = ["| init | fraction | runs | best step (mean) | steps run (mean) of planned | "
           "best step, % of steps run: mean (min–max) | stopped early | best at last validation |",
           "|---|---|---|---|---|---|---|---|"]
  flagged = []
  for init in inits:
    for f in fractions:
      picked = [r for r in known if r["init"] == init and float(r["fraction"]) == f]
      if not picked:
        continue
      best = np.array([float(r["best_step"]) for r in picked])
      run = np.array([float(r["stopped_step"]) for r in picked])
      planned = max(float(r["planned_steps"]) for r in picked)
      share = 100 * best / run
      early = sum(float(r["stopped_step"]) < float(r["planned_steps"]) for r in picked)
      at_last = [f"{init}/f{f:g}/seed{r['seed']}" for r, b, n in zip(picked, best, run) if b == n]
      flagged += at_last
      lines.append(f"| {init} | {_fraction_label(f)} | {len(picked)} | {best.mean():.0f} | "
                   f"{run.mean():.0f} of {planned:.0f} | {share.mean():.0f}% "
                   f"({share.min():.0f}–{share.max():.0f}%) | {early} | {len(at_last)} |")
  return ["## Where the best validation step fell", "",
          "Per fine-tuning run: the step of the state kept (best on the validation split, "
          "the one evaluated) against the steps it ran; a run stops early after `patience` "
          "validations without a new best. A best step at the last validation means more "
          "steps might still have improved it: that run did not converge.", "", *lines, "",
          "Best at the last validation: " + (", ".join(flagged) if flagged else "none") + ".",
          ""]


def seeds_note(rows: Sequence[Mapping]) -> str:
  counts = sorted({n for _, _, n in aggregate(rows, "overall_accuracy").values()})
  return ", ".join(str(n) for n in counts)


def results_markdown(rows: Sequence[Mapping], inits: Sequence[str], fractions: Sequence[float],
                     title: str, test_split: str,
                     probe: Mapping[str, tuple[float, float, int]] | None = None) -> str:
  """The report; `probe` (probe_scores of the probe's mIoU) adds a first mIoU column."""
  parts = [f"# {title}", "",
           f"Scores on the `{test_split}` split in %, mean ± sample std over seeds "
           f"(seeds per cell: {seeds_note(rows)}); columns are label fractions of the "
           "training split; the best mean per column is in bold.", ""]
  if probe:
    parts += ["The mIoU table's first column is the online probe (docs/probe.md) at the end of "
              "each pretraining run: a linear head on the frozen features, scored on the "
              "validation split, not the test split; for random init, the probe at step 0 of "
              "the pretraining runs.", ""]
  for key, label in METRICS:
    parts += [f"## {label}", "",
              metric_table(rows, key, inits, fractions, probe if key == "miou" else None), ""]
  parts += ["## Per-class IoU (mean over seeds)", "", per_class_table(rows, inits, fractions), ""]
  parts += paired_section(rows, inits, fractions)
  parts += best_step_section(rows, inits, fractions)
  return "\n".join(parts)


def write_markdown(path: pathlib.Path, text: str) -> None:
  files.write_text_atomic(path, text)


def plot_metrics(rows: Sequence[Mapping], inits: Sequence[str], fractions: Sequence[float],
                 out_dir: pathlib.Path, prefix: str = "") -> list[pathlib.Path]:
  """One PNG per metric: mean ± sample std over seeds (error bars) against label fraction
  (log axis), a line per init, each init's points shifted a little sideways so that nine
  or ten error bars at one fraction stay apart."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  markers = "osD^vP*Xhp"
  for key, label in METRICS:
    agg = aggregate(rows, key)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for k, init in enumerate(inits):
      fs = [f for f in fractions if (init, f) in agg]
      if not fs:
        continue
      means = np.array([100 * agg[(init, f)][0] for f in fs])
      stds = np.nan_to_num(np.array([100 * agg[(init, f)][1] for f in fs]))
      shift = 10 ** (0.012 * (k - (len(inits) - 1) / 2))  # multiplicative: the x axis is log
      ax.errorbar([100 * f * shift for f in fs], means, yerr=stds, marker=markers[k % len(markers)],
                  capsize=3, label=init)
    ax.set_xscale("log")
    # The same room either side of the fractions, whatever their number: autoscaled to one
    # fraction, the axis would span only the sideways shifts and put the inits at its edges.
    ax.set_xlim(100 * min(fractions) / 10 ** 0.2, 100 * max(fractions) * 10 ** 0.2)
    ax.set_xticks([100 * f for f in fractions], [_fraction_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel(f"{label} (%)")
    ax.set_title(f"{label}: mean ± sample std over seeds (seeds per point: {seeds_note(rows)})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    path = out_dir / f"{prefix}{key}.png"
    fig.savefig(path)
    plt.close(fig)
    written.append(path)
  return written


def plot_probe(histories: Mapping[tuple[str, int], Sequence[Mapping]], path: pathlib.Path,
               key: str = "probe_miou", control: str = "random") -> pathlib.Path | None:
  """One PNG: the probe's score against pretraining step, mean ± std over seeds per method,
  and the never-trained control (every run's step 0) as a dashed line; None without histories."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  by_method: dict[str, dict[int, list[float]]] = {}
  for (method, _), history in histories.items():
    for h in history:
      by_method.setdefault(method, {}).setdefault(int(h["step"]), []).append(float(h[key]))
  if not by_method:
    return None
  fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
  seeds = sorted({len(v) for steps in by_method.values() for v in steps.values()})
  ax.set_title(f"probe on the validation split: mean ± sample std\nover seeds (seeds per "
               f"point: {', '.join(map(str, seeds))})", fontsize=9)
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # steps are whole
  for method, steps in by_method.items():
    xs = sorted(steps)
    points = [mean_std(steps[x]) for x in xs]
    means = np.array([100 * m for m, _ in points])
    stds = np.nan_to_num(np.array([100 * s for _, s in points]))
    ax.plot(xs, means, marker="o", markersize=3, label=method)
    ax.fill_between(xs, means - stds, means + stds, alpha=0.2)
  control_mean = probe_scores(histories, key, control).get(control)
  if control_mean is not None:
    ax.axhline(100 * control_mean[0], color="gray", linestyle="--",
               label=f"{control} init (step 0)")
  ax.set_xlabel("pretraining step")
  ax.set_ylabel(f"probe {key.removeprefix('probe_').replace('miou', 'mIoU')} (%)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
