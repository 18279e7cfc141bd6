"""Losses against numpy oracles written from the reference's formulas, and the
sharded (8-device) losses against the same losses on the whole batch."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from glc_jax import losses
from glc_jax.parallel import DATA_AXIS, make_data_mesh


def ntxent_oracle(zi, zj, tau, valid=None):
  """The reference's NT-Xent in float64 numpy: full (2N, 2N) matrix, masks.

  Rows and columns of invalid pairs are dropped, which is what a batch made
  of the valid pairs only would give.
  """
  if valid is not None:
    zi, zj = zi[valid], zj[valid]
  zi = zi / np.linalg.norm(zi, axis=1, keepdims=True)
  zj = zj / np.linalg.norm(zj, axis=1, keepdims=True)
  bs = zi.shape[0]
  z = np.concatenate([zi, zj]).astype(np.float64)
  sim = np.exp(z @ z.T / tau)
  eye = np.eye(2 * bs)
  pos_mask = np.eye(2 * bs, k=bs) + np.eye(2 * bs, k=-bs)
  neg_mask = 1 - eye - pos_mask
  sim_pos = (sim * pos_mask).sum(1)
  sim_neg = (sim * neg_mask).sum(1)
  return np.mean(-np.log(sim_pos / (sim_neg + 1e-8)))


def moco_oracle(q, k, queue, tau):
  q = q / np.linalg.norm(q, axis=1, keepdims=True)
  k = k / np.linalg.norm(k, axis=1, keepdims=True)
  logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / tau
  m = logits.max(1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(1)) + m[:, 0]
  return np.mean(lse - logits[:, 0])


@pytest.fixture(scope="module")
def mesh8(devices):
  return make_data_mesh(devices)


def _sharded(mesh, fn, n_batch_args, n_repl_args=0):
  """jit(shard_map(fn)) with the first args split over the data axis."""
  specs = (P(DATA_AXIS),) * n_batch_args + (P(),) * n_repl_args
  mapped = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P()))

  def call(*args):
    placed = [jax.device_put(a, NamedSharding(mesh, s))
              for a, s in zip(args, specs)]
    return mapped(*placed)
  return call


def test_ntxent_matches_reference_formula():
  rng = np.random.default_rng(0)
  for n, d, tau in [(4, 8, 0.5), (16, 64, 0.5), (7, 3, 0.1)]:
    zi = rng.normal(size=(n, d)).astype(np.float32)
    zj = rng.normal(size=(n, d)).astype(np.float32)
    got = losses.ntxent_loss(zi, zj, temperature=tau)
    np.testing.assert_allclose(got, ntxent_oracle(zi, zj, tau), rtol=1e-6,
                               atol=1e-6)


def test_ntxent_positive_not_in_denominator():
  # Two pairs of identical unit vectors, orthogonal across pairs: every row's
  # only negative has similarity 0, the positive 1.
  z = np.eye(2, dtype=np.float32)
  tau = 0.5
  expected = -np.log(np.exp(1 / tau) / (np.exp(0.0) * 2 + 1e-8))
  np.testing.assert_allclose(losses.ntxent_loss(z, z, temperature=tau),
                             expected, rtol=1e-6)


def test_ntxent_validity_mask_drops_pairs():
  rng = np.random.default_rng(1)
  zi = rng.normal(size=(12, 16)).astype(np.float32)
  zj = rng.normal(size=(12, 16)).astype(np.float32)
  valid = rng.random(12) > 0.4
  got = losses.ntxent_loss(zi, zj, valid=valid)
  np.testing.assert_allclose(got, ntxent_oracle(zi, zj, 0.5, valid), rtol=1e-6)


def test_ntxent_gathered_on_8_devices_equals_whole_batch(mesh8):
  rng = np.random.default_rng(2)
  zi = rng.normal(size=(32, 16)).astype(np.float32)
  zj = rng.normal(size=(32, 16)).astype(np.float32)
  valid = rng.random(32) > 0.3

  def loss_and_grads(a, b, v, axis_name):
    f = functools.partial(losses.ntxent_loss, valid=v, axis_name=axis_name)
    return jax.value_and_grad(f, argnums=(0, 1))(a, b)

  want_loss, (want_ga, want_gb) = loss_and_grads(zi, zj, valid, None)

  # Gradients w.r.t. sharded inputs come back per device, so collect them
  # with an all_gather to compare as whole arrays.
  def sharded(a, b, v):
    loss, (ga, gb) = loss_and_grads(a, b, v, DATA_AXIS)
    return (loss, jax.lax.all_gather(ga, DATA_AXIS, tiled=True, to="invarying"),
            jax.lax.all_gather(gb, DATA_AXIS, tiled=True, to="invarying"))
  got_loss, got_ga, got_gb = _sharded(mesh8, sharded, 3)(zi, zj, valid)
  np.testing.assert_allclose(got_loss, ntxent_oracle(zi, zj, 0.5, valid),
                             rtol=1e-6)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(got_ga, want_ga, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got_gb, want_gb, rtol=1e-5, atol=1e-7)


def test_ntxent_local_negatives_is_mean_of_per_device_losses(mesh8):
  rng = np.random.default_rng(3)
  zi = rng.normal(size=(16, 8)).astype(np.float32)
  zj = rng.normal(size=(16, 8)).astype(np.float32)
  fn = functools.partial(losses.ntxent_loss, axis_name=DATA_AXIS,
                         gather_negatives=False)
  got = _sharded(mesh8, fn, 2)(zi, zj)
  per_device = [ntxent_oracle(zi[i:i + 2], zj[i:i + 2], 0.5)
                for i in range(0, 16, 2)]
  np.testing.assert_allclose(got, np.mean(per_device), rtol=1e-6)


def test_glcnet_loss_weights_and_ablations():
  rng = np.random.default_rng(4)
  g1, g2 = rng.normal(size=(2, 4, 8)).astype(np.float32)
  l1, l2 = rng.normal(size=(2, 4, 3, 8)).astype(np.float32)
  valid = rng.random((4, 3)) > 0.2
  want_g = ntxent_oracle(g1, g2, 0.5)
  want_l = ntxent_oracle(l1.reshape(12, 8), l2.reshape(12, 8), 0.5,
                         valid.reshape(12))
  loss, parts = losses.glcnet_loss(g1, g2, l1, l2, valid, weight=0.3)
  np.testing.assert_allclose(loss, 0.3 * want_g + 0.7 * want_l, rtol=1e-6)
  loss, parts = losses.glcnet_loss(None, None, l1, l2, valid)
  np.testing.assert_allclose(loss, want_l, rtol=1e-6)
  assert set(parts) == {"loss_local"}
  loss, parts = losses.glcnet_loss(g1, g2, None, None, None)
  np.testing.assert_allclose(loss, want_g, rtol=1e-6)
  assert set(parts) == {"loss_global"}


def test_moco_loss_and_queue(mesh8):
  rng = np.random.default_rng(5)
  q = rng.normal(size=(16, 8)).astype(np.float32)
  k = rng.normal(size=(16, 8)).astype(np.float32)
  queue = rng.normal(size=(64, 8)).astype(np.float32)
  queue /= np.linalg.norm(queue, axis=1, keepdims=True)
  want = moco_oracle(q, k, queue, 0.07)
  np.testing.assert_allclose(losses.moco_infonce_loss(q, k, queue), want,
                             rtol=1e-6)

  def sharded(q, k, queue, ptr):
    loss = losses.moco_infonce_loss(q, k, queue, axis_name=DATA_AXIS)
    new_queue, new_ptr = losses.enqueue_keys(queue, ptr, k, axis_name=DATA_AXIS)
    return loss, new_queue, new_ptr
  loss, new_queue, new_ptr = _sharded(mesh8, sharded, 2, 2)(
      q, k, queue, np.int32(48))
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  k_unit = k / np.linalg.norm(k, axis=1, keepdims=True)
  np.testing.assert_allclose(new_queue[48:], k_unit, rtol=1e-6)
  np.testing.assert_array_equal(new_queue[:48], queue[:48])
  assert int(new_ptr) == 0


def test_inpainting_loss_matches_reference_normalisation(mesh8):
  rng = np.random.default_rng(6)
  pred = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
  target = rng.normal(size=(8, 6, 6, 3)).astype(np.float32)
  erased = rng.random((8, 6, 6)) > 0.7
  # Reference: masks = 1 where kept, broadcast over bands.
  keep = np.repeat((~erased)[..., None], 3, axis=-1).astype(np.float64)
  se = (pred.astype(np.float64) - target) ** 2
  want = (0.99 * (se * (1 - keep)).sum() / (1 - keep).sum()
          + 0.01 * (se * keep).sum() / keep.sum())
  loss, _ = losses.inpainting_loss(pred, target, erased)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  fn = lambda p, t, e: losses.inpainting_loss(p, t, e, axis_name=DATA_AXIS)[0]
  np.testing.assert_allclose(_sharded(mesh8, fn, 3)(pred, target, erased), want,
                             rtol=1e-6)


def test_cross_entropy_ignores_label(mesh8):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(8, 5, 4)).astype(np.float32)
  labels = rng.integers(0, 4, size=(8, 5))
  labels[rng.random((8, 5)) > 0.6] = 255
  keep = labels != 255
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  picked = np.take_along_axis(logits, np.where(keep, labels, 0)[..., None], -1)[..., 0]
  want = (lse - picked)[keep].mean()
  fn = lambda x, y: losses.cross_entropy_loss(x, y, ignore_index=255,
                                              axis_name=DATA_AXIS)
  np.testing.assert_allclose(_sharded(mesh8, fn, 2)(logits, labels), want,
                             rtol=1e-6)


def test_ntxent_without_valid_pairs_is_zero_and_finite():
  z = np.ones((4, 8), np.float32)
  loss, grad = jax.value_and_grad(
      lambda a: losses.ntxent_loss(a, a + 1, valid=np.zeros(4, bool)))(z)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
