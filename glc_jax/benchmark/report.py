"""The benchmark's outputs: results.csv (one row per cell), results.md and plots.

Scores are reported in percent. Over seeds: the mean and the sample standard
deviation (ddof=1; '–' with a single seed). In each column of results.md the
best mean is in bold (all of them when they tie at the printed precision).
"""
from __future__ import annotations

import csv
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from glc_jax import files

METRICS = (("overall_accuracy", "OA"), ("kappa", "Kappa"), ("miou", "mIoU"))
CSV_FIELDS = ("init", "fraction", "seed", "overall_accuracy", "kappa", "miou", "mean_f1", "num_pixels")


def cell_row(init: str, fraction: float, seed: int, metrics: Mapping) -> dict:
  """One results.csv row from an evaluation's metrics.json (fractions of 1, not %)."""
  row = {"init": init, "fraction": fraction, "seed": seed}
  for key in CSV_FIELDS[3:]:
    value = metrics.get(key)
    row[key] = math.nan if value is None else value
  for name, scores in metrics.get("per_class", {}).items():
    value = scores.get("iou")
    row[f"iou_{name}"] = math.nan if value is None else value
  return row


def write_csv(path: pathlib.Path, rows: Sequence[Mapping]) -> None:
  classes = dict.fromkeys(k for r in rows for k in r if k.startswith("iou_"))  # first-seen order
  fields = list(CSV_FIELDS) + list(classes)
  tmp = path.with_name(f".{path.name}.tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


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
  stats = aggregate(rows, key)
  first = "probe (end of pretraining) | " if probe else ""
  header = "| init | " + first + " | ".join(_fraction_label(f) for f in fractions) + " |"
  lines = [header, "|---|" + "---|" * (len(fractions) + bool(probe))]
  best = {}
  for f in fractions:
    means = [_shown(stats[(i, f)][0]) for i in inits
             if (i, f) in stats and math.isfinite(stats[(i, f)][0])]
    best[f] = max(means) if means else None
  for init in inits:
    cells = []
    for f in fractions:
      if (init, f) not in stats:
        cells.append("")
        continue
      mean, std, _ = stats[(init, f)]
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
  return "\n".join(parts)


def write_markdown(path: pathlib.Path, text: str) -> None:
  files.write_text_atomic(path, text)


def plot_metrics(rows: Sequence[Mapping], inits: Sequence[str], fractions: Sequence[float],
                 out_dir: pathlib.Path, prefix: str = "") -> list[pathlib.Path]:
  """One PNG per metric: mean ± std against label fraction (log axis), a line per init."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  for key, label in METRICS:
    stats = aggregate(rows, key)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=110)
    for init in inits:
      fs = [f for f in fractions if (init, f) in stats]
      if not fs:
        continue
      means = np.array([100 * stats[(init, f)][0] for f in fs])
      stds = np.nan_to_num(np.array([100 * stats[(init, f)][1] for f in fs]))
      ax.errorbar([100 * f for f in fs], means, yerr=stds, marker="o", capsize=3, label=init)
    ax.set_xscale("log")
    ax.set_xticks([100 * f for f in fractions], [_fraction_label(f) for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of the training split")
    ax.set_ylabel(f"{label} (%)")
    ax.grid(alpha=0.3)
    ax.legend()
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
  for method, steps in by_method.items():
    xs = sorted(steps)
    stats = [mean_std(steps[x]) for x in xs]
    means = np.array([100 * m for m, _ in stats])
    stds = np.nan_to_num(np.array([100 * s for _, s in stats]))
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
