"""The collapse signals of losses.embedding_health against numpy over the explicit pair matrix."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from glc_jax import losses
from glc_jax.parallel import DATA_AXIS, make_data_mesh


def health_oracle(z1, z2, valid):
  """The three signals from every pair of rows, in float64."""
  z1, z2 = np.asarray(z1, np.float64)[valid], np.asarray(z2, np.float64)[valid]
  z1 /= np.linalg.norm(z1, axis=1, keepdims=True)
  z2 /= np.linalg.norm(z2, axis=1, keepdims=True)
  n = len(z1)
  e = np.concatenate([z1, z2])
  cos = e @ e.T
  negative = ~(np.eye(2 * n, dtype=bool) | np.eye(2 * n, k=n, dtype=bool)
               | np.eye(2 * n, k=-n, dtype=bool))
  return {"embed_std_x": e.std(axis=0).mean(), "cos_pos_x": np.mean(np.sum(z1 * z2, 1)),
          "cos_neg_x": cos[negative].mean()}


def _inputs(n=16, d=8, seed=0):
  rng = np.random.default_rng(seed)
  z1 = rng.normal(size=(n, d)).astype(np.float32) + 0.5
  z2 = z1 + 0.7 * rng.normal(size=(n, d)).astype(np.float32)
  valid = rng.random(n) < 0.7
  return z1, z2, valid


def test_health_matches_the_pairwise_oracle():
  z1, z2, valid = _inputs()
  got = losses.embedding_health(z1, z2, "x", valid=valid)
  want = health_oracle(z1, z2, valid)
  assert got.keys() == want.keys()
  for key in want:
    np.testing.assert_allclose(float(got[key]), want[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_identical_embeddings_read_as_collapsed():
  # Every row the same direction (scaled differently): the textbook collapse.
  row = np.arange(1.0, 9.0, dtype=np.float32)
  scales = np.arange(1, 13, dtype=np.float32)[:, None]
  got = losses.embedding_health(row * scales, 2 * row * scales, "global")
  np.testing.assert_allclose(float(got["embed_std_global"]), 0.0, atol=1e-6)
  np.testing.assert_allclose(float(got["cos_pos_global"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(got["cos_neg_global"]), 1.0, rtol=1e-5)


def test_orthogonal_embeddings():
  # 2n distinct basis vectors: std of each used coordinate is known, no cosine is nonzero.
  n, d = 4, 8
  eye = np.eye(d, dtype=np.float32)
  got = losses.embedding_health(eye[:n], eye[n:], "local")
  np.testing.assert_allclose(float(got["cos_pos_local"]), 0.0, atol=1e-7)
  np.testing.assert_allclose(float(got["cos_neg_local"]), 0.0, atol=1e-7)
  # Each coordinate is 1 in one of the 8 rows: std = sqrt(1/8 · 7/8).
  np.testing.assert_allclose(float(got["embed_std_local"]), np.sqrt(7 / 64), rtol=1e-6)


def test_health_on_8_devices_equals_the_whole_batch(devices):
  mesh = make_data_mesh(devices)
  z1, z2, valid = _inputs(n=32, seed=1)
  spec = NamedSharding(mesh, P(DATA_AXIS))
  sharded = jax.jit(jax.shard_map(
      lambda a, b, v: losses.embedding_health(a, b, "x", valid=v, axis_name=DATA_AXIS),
      mesh=mesh, in_specs=(P(DATA_AXIS),) * 3, out_specs=P()))
  got = sharded(*(jax.device_put(x, spec) for x in (z1, z2, valid)))
  want = losses.embedding_health(z1, z2, "x", valid=valid)
  for key in want:
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5, err_msg=key)


def test_health_has_no_gradient():
  z1, z2, _ = _inputs()
  grads = jax.grad(lambda a: sum(losses.embedding_health(a, z2, "x").values()))(jnp.asarray(z1))
  assert not np.any(np.asarray(grads))


def test_no_valid_pairs_is_finite():
  z1, z2, _ = _inputs()
  got = losses.embedding_health(z1, z2, "x", valid=np.zeros(16, bool))
  assert all(np.isfinite(float(v)) for v in got.values())
