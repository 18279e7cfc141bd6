"""Metrics against a hand-computed confusion matrix and independent formulas."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glc_jax import metrics
from glc_jax.parallel import DATA_AXIS, make_data_mesh

# 4 classes; class 3 appears in neither truth nor prediction of counted
# pixels (it is predicted only on ignored pixels, which must not count).
TRUTH = np.array([0, 0, 0, 1, 1, 2, 2, 255, 255, 0, 1])
PRED = np.array([0, 0, 1, 1, 2, 2, 0, 3, 1, 2, 1])
# Counted (truth, pred) pairs: (0,0)x2 (0,1) (0,2) (1,1)x2 (1,2) (2,2) (2,0).
HAND_CM = np.array([[2, 1, 1, 0],
                    [0, 2, 1, 0],
                    [1, 0, 1, 0],
                    [0, 0, 0, 0]])
NAMES = ("road", "building", "tree", "water")


def test_confusion_matrix_by_hand():
  cm = metrics.confusion_matrix(TRUTH.reshape(1, 11), PRED.reshape(1, 11), 4)
  np.testing.assert_array_equal(cm, HAND_CM)
  assert cm.dtype == np.int64


def test_scores_by_hand():
  s = metrics.compute_scores(HAND_CM, NAMES)
  # n = 9, diagonal 2 + 2 + 1; truth sums (4, 3, 2, 0), prediction sums
  # (3, 3, 3, 0); chance agreement (12 + 9 + 6) / 81 = 1/3.
  assert s.overall_accuracy == pytest.approx(5 / 9)
  assert s.kappa == pytest.approx((5 / 9 - 1 / 3) / (1 - 1 / 3))
  np.testing.assert_allclose(s.iou[:3], [2 / 5, 2 / 4, 1 / 4])
  np.testing.assert_allclose(s.precision[:3], [2 / 3, 2 / 3, 1 / 3])
  np.testing.assert_allclose(s.recall[:3], [2 / 4, 2 / 3, 1 / 2])
  np.testing.assert_allclose(s.f1[:3], [4 / 7, 4 / 6, 2 / 5])
  # Class 3 is absent from truth and prediction: excluded, not scored 0.
  assert math.isnan(s.iou[3]) and math.isnan(s.f1[3])
  assert math.isnan(s.precision[3]) and math.isnan(s.recall[3])
  np.testing.assert_array_equal(s.scored, [True, True, True, False])
  assert s.miou == pytest.approx((2 / 5 + 2 / 4 + 1 / 4) / 3)
  assert s.mean_f1 == pytest.approx((4 / 7 + 4 / 6 + 2 / 5) / 3)


def test_class_only_predicted_is_scored_zero_iou():
  # Class 2 never in the truth but predicted once: present in the prediction,
  # so it is scored (IoU 0, recall undefined, precision 0).
  cm = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
  s = metrics.compute_scores(cm)
  assert s.iou[2] == 0.0 and s.precision[2] == 0.0 and s.f1[2] == 0.0
  assert math.isnan(s.recall[2])
  assert s.miou == pytest.approx((3 / 4 + 1 + 0) / 3)


def _naive_cm(truth, pred, k, ignore):
  cm = np.zeros((k, k), np.int64)
  for t, p in zip(truth.ravel(), pred.ravel()):
    if t != ignore:
      cm[t, p] += 1
  return cm


def test_random_matrix_against_loop_and_kappa_formula():
  rng = np.random.default_rng(0)
  k = 6
  truth = rng.integers(0, k, size=(3, 17, 19))
  truth[rng.random(truth.shape) < 0.1] = 255
  pred = np.where(rng.random(truth.shape) < 0.6, truth % k,
                  rng.integers(0, k, size=truth.shape))
  cm = metrics.confusion_matrix(truth, pred, k)
  np.testing.assert_array_equal(cm, _naive_cm(truth, pred, k, 255))
  s = metrics.compute_scores(cm)
  # Kappa in count form: (n*sum(diag) - sum(row*col)) / (n^2 - sum(row*col)).
  n = cm.sum()
  rc = float(np.inner(cm.sum(0), cm.sum(1)))
  assert s.kappa == pytest.approx((n * np.trace(cm) - rc) / (n * n - rc))
  valid = truth != 255
  assert s.overall_accuracy == pytest.approx(
      np.mean(truth[valid] == pred[valid]))


def test_confusion_matrix_rejects_out_of_range():
  with pytest.raises(ValueError, match="label value 7"):
    metrics.confusion_matrix(np.array([0, 7]), np.array([0, 1]), 4)
  with pytest.raises(ValueError, match="prediction value 4"):
    metrics.confusion_matrix(np.array([0, 1]), np.array([0, 4]), 4)
  with pytest.raises(ValueError, match="shape"):
    metrics.confusion_matrix(np.zeros(3, int), np.zeros(4, int), 4)


def test_compute_scores_rejects_bad_matrix():
  with pytest.raises(ValueError, match="empty"):
    metrics.compute_scores(np.zeros((3, 3), int))
  with pytest.raises(ValueError, match=r"\(K, K\)"):
    metrics.compute_scores(np.zeros((3, 2), int))
  with pytest.raises(ValueError, match="class names"):
    metrics.compute_scores(HAND_CM, ["a"])


def test_kappa_undefined_when_single_class():
  s = metrics.compute_scores(np.array([[5, 0], [0, 0]]))
  assert s.overall_accuracy == 1.0 and math.isnan(s.kappa)
  assert s.as_dict()["kappa"] is None


def test_as_dict_is_strict_json():
  d = metrics.compute_scores(HAND_CM, NAMES).as_dict()
  back = json.loads(json.dumps(d, allow_nan=False))
  assert back["per_class"]["water"]["iou"] is None
  assert back["classes_scored"] == ["road", "building", "tree"]
  assert back["per_class"]["road"]["support"] == 4
  assert back["per_class"]["road"]["predicted"] == 3
  assert back["confusion_matrix"] == HAND_CM.tolist()
  assert back["miou"] == pytest.approx((2 / 5 + 2 / 4 + 1 / 4) / 3)


def test_format_table_lists_classes_and_unscored():
  table = metrics.format_table(metrics.compute_scores(HAND_CM, NAMES))
  assert "building" in table and "mIoU" in table and "Kappa" in table
  assert "38.33" in table  # mIoU in percent
  assert "not scored" in table and "water" in table.splitlines()[-1]


def test_confusion_matrix_jnp_matches_host_in_jit():
  cm = jax.jit(metrics.confusion_matrix_jnp, static_argnums=2)(
      jnp.asarray(TRUTH), jnp.asarray(PRED), 4)
  np.testing.assert_array_equal(np.asarray(cm), HAND_CM)


def test_confusion_matrix_jnp_psum_over_devices(devices):
  rng = np.random.default_rng(1)
  k = 5
  truth = rng.integers(0, k, size=(16, 8, 8)).astype(np.int32)
  truth[rng.random(truth.shape) < 0.2] = 255
  pred = rng.integers(0, k, size=truth.shape).astype(np.int32)
  mesh = make_data_mesh(devices)

  def per_device(t, p):
    cm = metrics.confusion_matrix_jnp(t, p, k, axis_name=DATA_AXIS)
    return cm[None]  # one copy per device, to check they all agree

  f = jax.jit(jax.shard_map(per_device, mesh=mesh,
                            in_specs=(P(DATA_AXIS), P(DATA_AXIS)),
                            out_specs=P(DATA_AXIS)))
  sharding = jax.sharding.NamedSharding(mesh, P(DATA_AXIS))
  out = np.asarray(f(jax.device_put(truth, sharding),
                     jax.device_put(pred, sharding)))
  expected = metrics.confusion_matrix(truth, pred, k)
  assert out.shape == (8, k, k)
  for d in range(8):
    np.testing.assert_array_equal(out[d], expected)


def test_format_table_aligns_wide_characters():
  # Each CJK character takes two terminal columns, so '低矮植被' (4 characters) is 8 columns
  # wide and '不透水面汽车' 12, the width of the name column.
  names = ("0", "低矮植被", "不透水面汽车")
  table = metrics.format_table(metrics.compute_scores(np.eye(3, dtype=np.int64), names))
  lines = table.splitlines()
  assert lines[0].startswith("class" + " " * 7 + "     IoU")
  assert lines[2].startswith("0" + " " * 11 + "  100.00")
  assert lines[3].startswith("低矮植被" + " " * 4 + "  100.00")
  assert lines[4].startswith("不透水面汽车" + "  100.00")
  assert lines[6].startswith("OA" + " " * 10 + "  100.00")
