"""Segmentation metrics from one global confusion matrix.

Convention: ``cm[t, p]`` counts pixels whose truth is class ``t`` and whose
prediction is class ``p`` (rows = truth, columns = prediction). Pixels whose
truth equals ``ignore_index`` are not counted.

Every score is computed from a single confusion matrix summed over the whole
evaluation set. The reference instead averaged per-tile IoUs, so a class absent
from a tile (in truth and prediction) scored 0 there; here a class absent from
both truth and prediction of the whole set is left out of mIoU (its IoU is
undefined, reported as NaN / ``null``), not scored 0.
"""
from __future__ import annotations

import dataclasses
import math
import unicodedata
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """Confusion matrix of one batch, on the host.

  Args:
    labels: integer truth of any shape, values in [0, num_classes) or
      `ignore_index`.
    preds: integer predictions of the same shape, values in [0, num_classes).
    num_classes: K.
    ignore_index: truth value whose pixels are skipped.

  Returns:
    (K, K) int64, rows = truth, columns = prediction. Sum over batches to
    accumulate.

  Raises:
    ValueError: shapes differ, or a truth/prediction value is outside the
      class range (other than `ignore_index` in the truth).
  """
  labels = np.asarray(labels)
  preds = np.asarray(preds)
  if labels.shape != preds.shape:
    raise ValueError(
        f"confusion_matrix: labels shape {labels.shape} != preds shape "
        f"{preds.shape}")
  labels = labels.reshape(-1).astype(np.int64)
  preds = preds.reshape(-1).astype(np.int64)
  valid = labels != ignore_index
  labels, preds = labels[valid], preds[valid]
  for name, values in (("label", labels), ("prediction", preds)):
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      bad = values[(values < 0) | (values >= num_classes)][0]
      raise ValueError(
          f"confusion_matrix: {name} value {bad} outside [0, {num_classes}) "
          f"(ignore_index={ignore_index})")
  counts = np.bincount(labels * num_classes + preds,
                       minlength=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(np.int64)


def confusion_matrix_jnp(labels: jax.Array, preds: jax.Array, num_classes: int,
                         ignore_index: int = IGNORE_INDEX,
                         axis_name: str | None = None) -> jax.Array:
  """Jittable confusion matrix of one batch.

  Inside `jax.shard_map`, pass the mesh axis name so that the per-device
  matrices are summed over devices (`psum`); the result is then identical on
  every device and equals the matrix of the global batch.

  Truth values outside [0, num_classes) (not only `ignore_index`) and
  predictions outside that range are dropped, since a traced function cannot
  raise; check data on the host with `confusion_matrix` if in doubt.

  Args:
    labels: integer truth, any shape.
    preds: integer predictions, same shape.
    num_classes: K (static).
    ignore_index: truth value whose pixels are skipped.
    axis_name: mesh axis to sum over, or None for a local matrix.

  Returns:
    (K, K) int32, rows = truth, columns = prediction. int32 holds 2**31 - 1
    pixels per call; accumulate across batches on the host in int64.
  """
  labels = labels.reshape(-1).astype(jnp.int32)
  preds = preds.reshape(-1).astype(jnp.int32)
  valid = ((labels != ignore_index) & (labels >= 0) & (labels < num_classes)
           & (preds >= 0) & (preds < num_classes))
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32),
                        length=num_classes * num_classes)
  cm = counts.reshape(num_classes, num_classes).astype(jnp.int32)
  if axis_name is not None:
    cm = jax.lax.psum(cm, axis_name)
  return cm


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den elementwise, NaN where den == 0."""
  num = np.asarray(num, np.float64)
  den = np.asarray(den, np.float64)
  out = np.full(np.broadcast(num, den).shape, np.nan)
  np.divide(num, den, out=out, where=den != 0)
  return out


def _json_float(x: float) -> float | None:
  """NaN is not valid JSON; undefined scores become null."""
  return None if math.isnan(x) else float(x)


@dataclasses.dataclass(frozen=True)
class SegmentationScores:
  """Scores of one confusion matrix. Per-class arrays are (K,) float64 with
  NaN where undefined; fractions are in [0, 1].

  Attributes:
    confusion: (K, K) int64, rows = truth, columns = prediction.
    class_names: K names.
    overall_accuracy: correct pixels / counted pixels.
    kappa: Cohen's kappa; NaN when chance agreement is 1 (a single class in
      both truth and prediction), where it is undefined.
    miou: mean IoU over `scored`.
    mean_f1: mean F1 over `scored`.
    iou, precision, recall, f1: per class. IoU and F1 are NaN for a class
      absent from both truth and prediction; precision is NaN for a class
      never predicted; recall NaN for a class absent from the truth.
    scored: (K,) bool, class present in truth or prediction.
  """
  confusion: np.ndarray
  class_names: tuple[str, ...]
  overall_accuracy: float
  kappa: float
  miou: float
  mean_f1: float
  iou: np.ndarray
  precision: np.ndarray
  recall: np.ndarray
  f1: np.ndarray
  scored: np.ndarray

  def as_dict(self) -> dict:
    """JSON-serialisable summary (NaN becomes None)."""
    support = self.confusion.sum(axis=1)
    predicted = self.confusion.sum(axis=0)
    per_class = {}
    for k, name in enumerate(self.class_names):
      per_class[name] = {
          "iou": _json_float(self.iou[k]),
          "precision": _json_float(self.precision[k]),
          "recall": _json_float(self.recall[k]),
          "f1": _json_float(self.f1[k]),
          "support": int(support[k]),
          "predicted": int(predicted[k]),
      }
    return {
        "overall_accuracy": _json_float(self.overall_accuracy),
        "kappa": _json_float(self.kappa),
        "miou": _json_float(self.miou),
        "mean_f1": _json_float(self.mean_f1),
        "num_pixels": int(self.confusion.sum()),
        "classes_scored": [
            n for n, s in zip(self.class_names, self.scored) if s],
        "per_class": per_class,
        "class_names": list(self.class_names),
        "confusion_matrix": self.confusion.tolist(),
    }


def compute_scores(confusion: np.ndarray,
                   class_names: Sequence[str] | None = None
                   ) -> SegmentationScores:
  """OA, Kappa, mIoU and per-class IoU/precision/recall/F1 of a global matrix.

  Args:
    confusion: (K, K) non-negative integer counts summed over the whole
      evaluation set, rows = truth, columns = prediction.
    class_names: K names; defaults to "0", "1", ...

  Raises:
    ValueError: the matrix is not square, is negative, is empty (no counted
      pixel), or `class_names` has the wrong length.
  """
  cm = np.asarray(confusion)
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"compute_scores: confusion matrix must be (K, K), got "
                     f"shape {cm.shape}")
  if (cm < 0).any():
    raise ValueError("compute_scores: confusion matrix has negative counts")
  cm = cm.astype(np.int64)
  num_classes = cm.shape[0]
  names = (tuple(str(i) for i in range(num_classes)) if class_names is None
           else tuple(class_names))
  if len(names) != num_classes:
    raise ValueError(f"compute_scores: {len(names)} class names for "
                     f"{num_classes} classes")
  total = cm.sum()
  if total == 0:
    raise ValueError("compute_scores: confusion matrix is empty (no labelled "
                     "pixels were counted)")

  tp = np.diag(cm).astype(np.float64)
  truth = cm.sum(axis=1).astype(np.float64)
  pred = cm.sum(axis=0).astype(np.float64)
  scored = (truth + pred) > 0

  # Fractions before products, so n**2 never overflows for huge pixel counts.
  observed = tp.sum() / total
  chance = float(np.sum((truth / total) * (pred / total)))
  kappa = (observed - chance) / (1.0 - chance) if chance < 1.0 else math.nan

  iou = _divide(tp, truth + pred - tp)
  f1 = _divide(2.0 * tp, truth + pred)
  return SegmentationScores(
      confusion=cm,
      class_names=names,
      overall_accuracy=float(observed),
      kappa=float(kappa),
      miou=float(iou[scored].mean()),
      mean_f1=float(f1[scored].mean()),
      iou=iou,
      precision=_divide(tp, pred),
      recall=_divide(tp, truth),
      f1=f1,
      scored=scored,
  )


def tile_class_iou(labels: np.ndarray, preds: np.ndarray, num_classes: int,
                   ignore_index: int | None = 255) -> np.ndarray:
  """(K,) float64 IoU of each class on one tile, the reference's way: a class
  absent from both truth and prediction scores 0, not NaN.

  The reference averages these over the tiles it evaluates and then over the
  classes (its reported mIoU, `reference_tile_miou`); pixels labelled
  `ignore_index` are left out (the reference's 7-class route has none).
  """
  labels = np.asarray(labels).ravel()
  preds = np.asarray(preds).ravel()
  if ignore_index is not None:
    keep = labels != ignore_index
    labels, preds = labels[keep], preds[keep]
  classes = np.arange(num_classes)[:, None]
  truth, predicted = labels[None] == classes, preds[None] == classes
  inter = np.sum(truth & predicted, axis=1)
  union = np.sum(truth | predicted, axis=1)
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def reference_tile_miou(tile_ious: np.ndarray) -> float:
  """The reference's mIoU: (T, K) per-tile IoUs averaged over tiles, then classes."""
  return float(np.mean(np.mean(np.asarray(tile_ious, np.float64), axis=0)))


def text_width(text: str) -> int:
  """Terminal columns `text` takes: East Asian wide characters take two, combining marks none."""
  return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
             for c in text)


def pad(text: str, width: int) -> str:
  """`text` followed by spaces up to `width` terminal columns (str.ljust counts characters)."""
  return text + " " * (width - text_width(text))


def format_table(scores: SegmentationScores) -> str:
  """Plain-text table: one row per class, then the summary scores (in %)."""

  def pct(x: float) -> str:
    return "     -" if math.isnan(x) else f"{100.0 * x:6.2f}"

  width = max(8, *(text_width(n) for n in scores.class_names))
  support = scores.confusion.sum(axis=1)
  header = (f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}  "
            f"{'F1':>6}  {'pixels':>12}")
  lines = [header, "-" * len(header)]
  for k, name in enumerate(scores.class_names):
    lines.append(
        f"{pad(name, width)}  {pct(scores.iou[k])}  {pct(scores.precision[k])}  "
        f"{pct(scores.recall[k])}  {pct(scores.f1[k])}  {support[k]:>12d}")
  lines.append("-" * len(header))
  unscored = [n for n, s in zip(scores.class_names, scores.scored) if not s]
  lines.append(f"{'OA':<{width}}  {pct(scores.overall_accuracy)}")
  lines.append(f"{'Kappa':<{width}}  {pct(scores.kappa)}")
  lines.append(f"{'mIoU':<{width}}  {pct(scores.miou)}")
  lines.append(f"{'mean F1':<{width}}  {pct(scores.mean_f1)}")
  if unscored:
    lines.append(f"not scored (absent from truth and prediction): "
                 f"{', '.join(unscored)}")
  return "\n".join(lines)
