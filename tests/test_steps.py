"""One train step on 8 devices equals the same step on 1 device.

For each method the oracle is the same step run on a one-device mesh with
the same global batch: loss and its parts, the gradient (captured by a
pass-through optimiser stage), the updated parameters, the BatchNorm running
statistics and the method's extra state must agree to float32 rounding.

Dropout is switched off (through a Flax method interceptor) because its
masks are drawn per device and so legitimately differ between meshes. ReLU
and max-pool are swapped for softplus and average pooling in both runs: the
two meshes sum BatchNorm statistics in different orders, and a piecewise-
linear gate whose input lies within float32 rounding of its kink would route
a gradient differently (random 32x32 inputs hit one such value about every
other seed). The swap keeps every cross-device reduction under test.
"""
import contextlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from glc_jax import methods, parallel
from glc_jax.models import resnet

from conftest import assert_tree_close

GLOBAL_BATCH = 8
IMAGE = 32
BANDS = 4
PATCHES = 4
PATCH = 8
LR = 0.5
# Loss parts near zero (MoCo's, with near-identical query and key) are
# differences of logits of order 1/T; float32 rounding of those is ~1e-7, a
# sharding error (a lost negative, a doubled reduction) is orders larger.
METRIC_ATOL = 1e-6
TINY_MODEL = dict(depth=18, width=0.125, embed_dim=16)


def _no_dropout(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
    return args[0]
  return next_fun(*args, **kwargs)


def _avg_pool(x, k, stride, padding, conv_impl):
  del conv_impl
  return nn.avg_pool(x, (k, k), strides=(stride, stride), padding=((padding, padding),) * 2)


@contextlib.contextmanager
def smooth_network():
  """No dropout; softplus for ReLU and average for max pooling (see above)."""
  with mock.patch.object(nn, "relu", jax.nn.softplus), \
       mock.patch.object(resnet, "max_pool", _avg_pool), \
       nn.intercept_methods(_no_dropout):
    yield


def _batch(seed):
  rng = np.random.default_rng(seed)

  def boxes():
    y = rng.integers(0, IMAGE - PATCH, (GLOBAL_BATCH, PATCHES))
    x = rng.integers(0, IMAGE - PATCH, (GLOBAL_BATCH, PATCHES))
    return np.stack([y, x, y + PATCH, x + PATCH], -1).astype(np.int32)
  shape = (GLOBAL_BATCH, IMAGE, IMAGE, BANDS)
  valid = rng.random((GLOBAL_BATCH, PATCHES)) > 0.25
  valid[:, 0] = True
  erased = np.zeros(shape[:3], bool)
  for b, y, x in zip(*(rng.integers(0, n, 4 * GLOBAL_BATCH)
                       for n in (GLOBAL_BATCH, IMAGE - 8, IMAGE - 8))):
    erased[b, y:y + 8, x:x + 8] = True
  return dict(view1=rng.normal(size=shape).astype(np.float32),
              view2=rng.normal(size=shape).astype(np.float32),
              patch_boxes1=boxes(), patch_boxes2=boxes(), patch_valid=valid,
              image=rng.normal(size=shape).astype(np.float32), mask=erased,
              tiles=rng.normal(size=(GLOBAL_BATCH, 9, 16, 16, BANDS)
                               ).astype(np.float32),
              perm_index=rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32),
              label=np.where(rng.random(shape[:3]) < 0.2, 255,
                             rng.integers(0, 5, shape[:3])).astype(np.int32))


def _keep_gradient():
  """Optimiser stage that passes updates through and stores them as its state."""
  return optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))


def _tx():
  return optax.chain(_keep_gradient(), optax.sgd(LR))


def _run_step(method, host_state, batch, devices):
  mesh = parallel.make_data_mesh(devices)
  tx = _tx()
  step = methods.make_train_step(method, tx, lambda s: LR, mesh)
  state = parallel.replicate(host_state, mesh)
  sharded = parallel.shard_host_batch(
      {k: batch[k] for k in method.batch_keys}, mesh)
  with smooth_network():
    new_state, metrics = step(state, sharded, jax.random.key(7))
  return jax.device_get(new_state), jax.device_get(metrics)


def check_one_vs_eight_devices(config, devices, seed=0, rtol=1e-5):
  method = methods.create_method(config)
  batch = _batch(seed)
  init_mesh = parallel.make_data_mesh(devices[:1])
  with smooth_network():
    state = methods.init_train_state(method, _tx(), init_mesh,
                                     jax.random.key(seed), batch)
  host_state = jax.device_get(state)

  one_state, one_metrics = _run_step(method, host_state, batch, devices[:1])
  eight_state, eight_metrics = _run_step(method, host_state, batch, devices)

  assert set(one_metrics) == set(eight_metrics)
  for key in one_metrics:
    np.testing.assert_allclose(eight_metrics[key], one_metrics[key], rtol=1e-5,
                               atol=METRIC_ATOL, err_msg=key)
  assert np.isfinite(one_metrics["loss"]) and one_metrics["grad_norm"] > 0
  assert_tree_close(eight_state.opt_state[0], one_state.opt_state[0], "gradient",
                rtol=rtol)
  assert_tree_close(eight_state.params, one_state.params, "params", rtol=1e-6)
  assert_tree_close(eight_state.batch_stats, one_state.batch_stats, "batch_stats")
  assert_tree_close(eight_state.extras, one_state.extras, "extras")
  assert int(eight_state.step) == int(one_state.step) == 1
  # The stats really moved, so the comparison above is not of initial values.
  changed = jax.tree.map(lambda a, b: np.any(a != b), one_state.batch_stats,
                         host_state.batch_stats)
  assert any(jax.tree.leaves(changed))
  return host_state, one_state, one_metrics


def _config(name, **loss):
  return ml_collections.ConfigDict(dict(method=name, model=dict(TINY_MODEL),
                                        loss=loss))


def test_glcnet_step_is_device_count_invariant(devices):
  _, _, metrics = check_one_vs_eight_devices(_config("glcnet"), devices)
  assert {"loss_global", "loss_local"} <= set(metrics)
  np.testing.assert_allclose(
      metrics["loss"], 0.5 * (metrics["loss_global"] + metrics["loss_local"]),
      rtol=1e-6)


def test_mocov2_step_is_device_count_invariant(devices):
  host, one, _ = check_one_vs_eight_devices(
      _config("mocov2", queue_size=4 * GLOBAL_BATCH), devices)
  # EMA of the START-of-step query parameters into the key network.
  want = jax.tree.map(lambda k, q: 0.999 * k + 0.001 * q,
                      host.extras["key_params"], host.params)
  assert_tree_close(one.extras["key_params"], want, "key_params", rtol=1e-6,
                leaf_rtol=1e-6)
  assert int(one.extras["queue_ptr"]) == GLOBAL_BATCH
  np.testing.assert_array_equal(one.extras["queue"][GLOBAL_BATCH:],
                                host.extras["queue"][GLOBAL_BATCH:])
  np.testing.assert_allclose(
      np.linalg.norm(one.extras["queue"][:GLOBAL_BATCH], axis=1), 1.0, rtol=1e-6)

  # Starting from given variables (fine-tuning / transfer): step 0, those
  # parameters, a key network copied from them.
  method = methods.create_method(_config("mocov2", queue_size=4 * GLOBAL_BATCH))
  given = {"params": one.params, "batch_stats": one.batch_stats}
  state = jax.device_get(methods.init_train_state(
      method, _tx(), parallel.make_data_mesh(devices), jax.random.key(3),
      _batch(0), variables=given))
  assert int(state.step) == 0
  assert_tree_close(state.params, one.params, "given params", rtol=0, leaf_rtol=0)
  assert_tree_close(state.extras["key_params"], one.params, "key copy", rtol=0,
                leaf_rtol=0)


# GLCNet's ablations are not run here: each only drops a branch or the variance
# of glcnet's step above (no collective of its own), and their switches are
# tested in test_models.py; each 1-vs-8 pair costs two compiles.
@pytest.mark.slow
def test_simclr_is_device_count_invariant(devices):
  _, _, metrics = check_one_vs_eight_devices(_config("simclr"), devices)
  assert "loss_local" not in metrics


@pytest.mark.slow
@pytest.mark.parametrize("name", ["inpainting", "jigsaw", "segmentation"])
def test_inpainting_jigsaw_segmentation_are_device_count_invariant(name,
                                                                  devices):
  model = {k: v for k, v in TINY_MODEL.items() if k != "embed_dim"}
  if name == "jigsaw":
    model["num_permutations"] = 10
  if name == "segmentation":
    model["num_classes"] = 5
  config = ml_collections.ConfigDict(dict(method=name, model=model))
  # Not among the 1e-5 criteria; nine BN groups (jigsaw),
  # transposed convs (inpainting) and per-pixel logits round a little more.
  _, _, metrics = check_one_vs_eight_devices(config, devices, rtol=3e-5)
  if name == "inpainting":
    np.testing.assert_allclose(
        metrics["loss"],
        0.99 * metrics["loss_erased"] + 0.01 * metrics["loss_kept"], rtol=1e-6)


def test_bad_inputs_are_clear_errors(devices):
  with pytest.raises(ValueError, match="config.method"):
    methods.create_method(ml_collections.ConfigDict(dict(method="byol")))
  with pytest.raises(ValueError, match="config.loss"):
    methods.create_method(_config("simclr", weight=0.3))
  with pytest.raises(ValueError, match="not a positive multiple"):
    parallel.check_global_batch(12, parallel.make_data_mesh(devices))
  method = methods.create_method(_config("glcnet"))
  with pytest.raises(ValueError, match="patch_valid"):
    method.check_batch({"view1": None, "view2": None})


def _one_device_step(config, devices, seed=0):
  """(state before, state after, metrics) of one step on one device, smooth network."""
  method = methods.create_method(config)
  batch = _batch(seed)
  with smooth_network():
    state = methods.init_train_state(method, _tx(), parallel.make_data_mesh(devices[:1]),
                                     jax.random.key(seed), batch)
  host_state = jax.device_get(state)
  return (host_state,) + _run_step(method, host_state, batch, devices[:1])


@pytest.mark.parametrize("options", [dict(remat="nothing_saveable"),
                                     dict(remat="dots_saveable", conv_impl="plain")])
def test_remat_and_plain_kernels_give_the_same_step(options, devices):
  # Oracle: the default step (CPU kernels, every activation kept) on the same batch.
  _, want_state, want_metrics = _one_device_step(_config("glcnet"), devices)
  config = _config("glcnet")
  config.model.update(options)
  _, state, metrics = _one_device_step(config, devices)
  for key in want_metrics:
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-5, atol=METRIC_ATOL,
                               err_msg=key)
  assert_tree_close(state.opt_state[0], want_state.opt_state[0], "gradient")
  assert_tree_close(state.params, want_state.params, "params", rtol=1e-6)
  assert_tree_close(state.batch_stats, want_state.batch_stats, "batch_stats")


@pytest.mark.parametrize("backend,dtype,conv_impl", [("cpu", jnp.float32, "cpu"),
                                                     ("gpu", jnp.bfloat16, "plain"),
                                                     ("tpu", jnp.bfloat16, "plain")])
def test_auto_dtype_and_kernels_follow_the_backend(backend, dtype, conv_impl, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  method = methods.create_method(_config("glcnet"))
  assert (method.model.dtype, method.model.conv_impl) == (dtype, conv_impl)
  config = _config("glcnet")
  config.model.update(dtype="float32", conv_impl="cpu")
  method = methods.create_method(config)
  assert (method.model.dtype, method.model.conv_impl) == (jnp.float32, "cpu")


@pytest.mark.parametrize("key,value", [("dtype", "float16"), ("conv_impl", "gpu"),
                                       ("remat", "save_all")])
def test_bad_model_compute_options_are_clear_errors(key, value):
  config = _config("glcnet")
  config.model[key] = value
  with pytest.raises(ValueError, match=f"config.model.{key} = '{value}'"):
    methods.create_method(config)


def test_bfloat16_step_keeps_state_and_losses_float32(devices):
  config = _config("glcnet")
  config.model.dtype = "bfloat16"
  before, state, metrics = _one_device_step(config, devices)
  for what, tree in (("params", state.params), ("batch_stats", state.batch_stats),
                     ("opt_state", state.opt_state), ("metrics", metrics)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      assert leaf.dtype == np.float32, f"{what}{jax.tree_util.keystr(path)}: {leaf.dtype}"
  assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
  moved = jax.tree.map(lambda a, b: np.any(a != b), state.params, before.params)
  assert all(jax.tree.leaves(moved))
