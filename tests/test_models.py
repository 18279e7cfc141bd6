"""Layers and networks against numpy oracles, SyncBN against a single device."""
import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glc_jax import models
from glc_jax.models import layers

from conftest import assert_tree_close

RNG = np.random.default_rng(0)


def _init_apply(layer, *args):
  variables = layer.init(jax.random.key(0), *args)
  return variables, layer.apply(variables, *args)


# ---------------------------------------------------------------- numpy oracles
def np_conv(x, w, stride, pad, dil):
  """Direct NHWC convolution, w (k, k, Cin, Cout)."""
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  k = w.shape[0]
  ho = (x.shape[1] - dil * (k - 1) - 1) // stride + 1
  wo = (x.shape[2] - dil * (k - 1) - 1) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(ho):
    for j in range(wo):
      for a in range(k):
        for b in range(k):
          out[:, i, j] += x[:, i * stride + a * dil, j * stride + b * dil] @ w[a, b]
  return out


def np_resize_align_corners(x, out_h, out_w):
  """Per-output-pixel bilinear interpolation, align_corners=True."""
  _, h, w, _ = x.shape
  out = np.zeros((x.shape[0], out_h, out_w, x.shape[3]))
  for i in range(out_h):
    sy = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = int(np.floor(sy)); y1 = min(y0 + 1, h - 1); fy = sy - y0
    for j in range(out_w):
      sx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = int(np.floor(sx)); x1 = min(x0 + 1, w - 1); fx = sx - x0
      out[:, i, j] = ((1 - fy) * ((1 - fx) * x[:, y0, x0] + fx * x[:, y0, x1])
                      + fy * ((1 - fx) * x[:, y1, x0] + fx * x[:, y1, x1]))
  return out


def np_conv_transpose(x, w, stride, pad, out_pad):
  """Scatter definition of torch ConvTranspose2d, w (k, k, Cin, Cout)."""
  b, h, wd, _ = x.shape
  k = w.shape[0]
  full = np.zeros((b, (h - 1) * stride + k + out_pad, (wd - 1) * stride + k + out_pad, w.shape[3]))
  for i in range(h):
    for j in range(wd):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          "bc,klcd->bkld", x[:, i, j], w)
  ho = (h - 1) * stride - 2 * pad + k + out_pad
  wo = (wd - 1) * stride - 2 * pad + k + out_pad
  return full[:, pad:pad + ho, pad:pad + wo]


# ---------------------------------------------------------------- layers
CONV_IMPLS = ("plain", "cpu")


@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
def test_dilated_strided_conv_matches_numpy(conv_impl):
  x = RNG.normal(size=(2, 13, 11, 3)).astype(np.float32)
  conv = layers.Conv2d(5, 3, stride=2, padding=2, dilation=2, use_bias=False, conv_impl=conv_impl)
  variables, y = _init_apply(conv, jnp.asarray(x))
  want = np_conv(x, np.asarray(variables["params"]["kernel"]), 2, 2, 2)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)



# With conv_impl 'cpu', dilated "same" convs (rates below, at and beyond the map size) run as
# per-tap matmuls and 1×1 convs (strided too) as matmuls; 'plain' convolves. Each must equal the
# full definition.
@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("size,k,stride,pad,dil", [
    ((8, 8), 3, 1, 6, 6), ((8, 8), 3, 1, 12, 12), ((8, 20), 3, 1, 18, 18),
    ((14, 14), 3, 1, 12, 12), ((5, 6), 3, 1, 2, 2), ((9, 7), 1, 1, 0, 1), ((9, 7), 1, 2, 0, 1)])
def test_conv_paths_match_numpy_values_and_kernel_gradients(size, k, stride, pad, dil, conv_impl):
  x = RNG.normal(size=(2, *size, 3)).astype(np.float32)
  conv = layers.Conv2d(4, k, stride=stride, padding=pad, dilation=dil, conv_impl=conv_impl)
  variables, y = _init_apply(conv, jnp.asarray(x))
  w = np.asarray(variables["params"]["kernel"], np.float64)
  np.testing.assert_allclose(np.asarray(y), np_conv(x, w, stride, pad, dil), rtol=1e-5, atol=1e-5)
  cotangent = RNG.normal(size=y.shape)
  grad = jax.grad(lambda v: jnp.sum(conv.apply(v, jnp.asarray(x)) * cotangent))(variables)
  # d/dw[a, b] of sum(conv · g) = sum over outputs of input tap (a, b) ⊗ g: a conv of x with g.
  want = np.zeros_like(w)
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  for a in range(k):
    for b in range(k):
      taps = xp[:, a * dil::stride, b * dil::stride][:, :y.shape[1], :y.shape[2]]
      want[a, b] = np.einsum("bhwc,bhwf->cf", taps, cotangent)
  np.testing.assert_allclose(np.asarray(grad["params"]["kernel"]), want, rtol=1e-4, atol=1e-4)

@pytest.mark.parametrize("conv_impl", CONV_IMPLS)
@pytest.mark.parametrize("shape,k,stride,pad", [((2, 9, 8, 3), 3, 2, 1), ((1, 7, 7, 2), 2, 2, 0)])
def test_max_pool_values_and_first_max_gradient_follow_torch(shape, k, stride, pad, conv_impl):
  # Values from a small set so windows hold ties at positive values too.
  x = RNG.integers(0, 4, size=shape).astype(np.float32)
  y = np.asarray(layers.max_pool(jnp.asarray(x), k, stride, pad, conv_impl))
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  ho, wo = (xp.shape[1] - k) // stride + 1, (xp.shape[2] - k) // stride + 1
  g = RNG.normal(size=(shape[0], ho, wo, shape[3]))
  want_y = np.zeros((shape[0], ho, wo, shape[3]))
  want_dx = np.zeros_like(xp, dtype=np.float64)
  for n in range(shape[0]):
    for c in range(shape[3]):
      for i in range(ho):
        for j in range(wo):
          window = xp[n, i * stride:i * stride + k, j * stride:j * stride + k, c]
          a, b = np.unravel_index(np.argmax(window), window.shape)  # first max, row-major
          want_y[n, i, j, c] = window[a, b]
          want_dx[n, i * stride + a, j * stride + b, c] += g[n, i, j, c]
  np.testing.assert_array_equal(y, want_y)
  dx = jax.grad(lambda v: jnp.sum(layers.max_pool(v, k, stride, pad, conv_impl) * g))(
      jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(dx), want_dx[:, pad:pad + shape[1], pad:pad + shape[2]],
                             rtol=1e-6, atol=1e-6)


def test_conv_transpose_matches_torch_definition():
  x = RNG.normal(size=(2, 5, 4, 3)).astype(np.float32)
  for k, p, op in ((5, 2, 0), (5, 2, 1), (3, 1, 1)):
    conv = layers.ConvTranspose2d(4, k, 2, p, op, use_bias=False)
    variables, y = _init_apply(conv, jnp.asarray(x))
    want = np_conv_transpose(x, np.asarray(variables["params"]["kernel"]), 2, p, op)
    assert y.shape == want.shape
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((4, 7), (16, 13)), ((14, 14), (56, 56)),
                                     ((1, 1), (5, 3)), ((9, 6), (4, 6))])
def test_align_corners_resize_matches_numpy(src, dst):
  x = RNG.normal(size=(2,) + src + (3,)).astype(np.float32)
  y = models.resize_bilinear_align_corners(jnp.asarray(x), dst)
  np.testing.assert_allclose(np.asarray(y), np_resize_align_corners(x, *dst),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_align_corners_resize_gradient_is_the_transposed_interpolation(dtype, rtol):
  x = RNG.normal(size=(2, 5, 7, 3))
  g = RNG.normal(size=(2, 9, 13, 3))
  grad_fn = jax.grad(lambda x: jnp.sum(
      models.resize_bilinear_align_corners(x, (9, 13)).astype(jnp.float32) * g))
  got = np.asarray(jax.jit(grad_fn)(jnp.asarray(x, dtype)), np.float64)
  ah, aw = layers.align_corners_matrix(5, 9), layers.align_corners_matrix(7, 13)
  want = np.einsum("bhwc,hi,wj->bijc", g, ah.astype(np.float64), aw.astype(np.float64))
  assert np.abs(got - want).max() <= rtol * np.abs(want).max()
  # Autodiff's transpose of the gathers, scatter-adds, is what it replaces.
  assert "scatter" not in str(jax.make_jaxpr(grad_fn)(jnp.asarray(x, dtype)))


def test_nearest_resize_and_adaptive_pool_follow_torch_rules():
  x = RNG.normal(size=(1, 27, 5, 2)).astype(np.float32)
  y = np.asarray(models.resize_nearest_torch(jnp.asarray(x), (14, 10)))
  rows = [int(np.floor(i * 27 / 14)) for i in range(14)]
  cols = [int(np.floor(j * 5 / 10)) for j in range(10)]
  np.testing.assert_array_equal(y, x[:, rows][:, :, cols])
  x = RNG.normal(size=(2, 7, 4, 3)).astype(np.float32)
  pooled = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), 3))
  for i in range(3):
    for j in range(3):
      r0, r1 = (i * 7) // 3, -((-(i + 1) * 7) // 3)
      c0, c1 = (j * 4) // 3, -((-(j + 1) * 4) // 3)
      np.testing.assert_allclose(pooled[:, i, j], x[:, r0:r1, c0:c1].mean((1, 2)), rtol=1e-5)


def test_box_mean_of_upsampled_matches_full_resolution_numpy():
  feats = RNG.normal(size=(2, 16, 16, 5)).astype(np.float32)
  boxes = np.array([[[0, 0, 64, 64], [10, 3, 26, 19], [40, 50, 41, 51]],
                    [[5, 7, 53, 55], [0, 0, 1, 64], [60, 60, 64, 64]]], np.int32)
  got = np.asarray(models.box_mean_of_upsampled(jnp.asarray(feats), jnp.asarray(boxes), (64, 64)))
  full = np_resize_align_corners(feats, 64, 64)
  for b in range(2):
    for p in range(3):
      y0, x0, y1, x1 = boxes[b, p]
      np.testing.assert_allclose(got[b, p], full[b, y0:y1, x0:x1].mean((0, 1)),
                                 rtol=1e-5, atol=1e-6)


def test_batchnorm_torch_semantics_and_groups():
  x = RNG.normal(2.0, 3.0, size=(6, 5, 4, 3)).astype(np.float32)
  bn = layers.BatchNorm(train=True, torch_momentum=0.9)
  variables = bn.init(jax.random.key(0), jnp.asarray(x))
  y, upd = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(np.asarray(y), (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-5)
  n = 6 * 5 * 4
  np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.9 * mean, rtol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["var"], 0.1 + 0.9 * var * n / (n - 1), rtol=1e-5)
  # Two groups == two successive calls on the halves.
  grouped = layers.BatchNorm(train=True, groups=2)
  y2, upd2 = grouped.apply(variables, jnp.asarray(x), mutable=["batch_stats"])
  ya, st = bn.apply(variables, jnp.asarray(x[:3]), mutable=["batch_stats"])
  yb, st = bn.apply({"params": variables["params"], **st}, jnp.asarray(x[3:]),
                    mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(y2), np.concatenate([ya, yb]), rtol=1e-5, atol=1e-6)
  for k in ("mean", "var"):
    np.testing.assert_allclose(upd2["batch_stats"][k], st["batch_stats"][k], rtol=1e-6)
  # Eval mode uses the running statistics.
  ye = layers.BatchNorm(train=False).apply({"params": variables["params"], **upd}, jnp.asarray(x))
  rm, rv = np.asarray(upd["batch_stats"]["mean"]), np.asarray(upd["batch_stats"]["var"])
  np.testing.assert_allclose(np.asarray(ye), (x - rm) / np.sqrt(rv + 1e-5), rtol=1e-4, atol=1e-5)


def _two_pass_batchnorm(x, scale, bias, groups, m=0.9, eps=1e-5):
  """Training BatchNorm by its definition, for autodiff in float64: (y, running mean,
  running var) from running statistics (0, 1), the groups updating them in turn."""
  xg = x.reshape((groups, -1) + x.shape[1:])
  axes = tuple(range(1, xg.ndim - 1))
  mean = jnp.mean(xg, axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axes, keepdims=True)
  y = ((xg - mean) * jax.lax.rsqrt(var + eps) * scale + bias).reshape(x.shape)
  n = xg[0].size // x.shape[-1]
  run_mean, run_var = 0.0, 1.0
  for i in range(groups):
    run_mean = (1 - m) * run_mean + m * mean[i].ravel()
    run_var = (1 - m) * run_var + m * var[i].ravel() * n / (n - 1)
  return y, run_mean, run_var


def _batchnorm_problem(seed=0, batch=8):
  """x (offset mean 3 against a std of 2, which would expose a backward pass that subtracts
  uncentred sums), loss weights for y and for the running statistics, scale, bias."""
  rng = np.random.default_rng(seed)
  x = rng.normal(3.0, 2.0, size=(batch, 5, 6, 7))
  w, a, b = rng.normal(size=x.shape), rng.normal(size=7), rng.normal(size=7)
  return x, (w, a, b), {"scale": rng.uniform(0.5, 1.5, 7), "bias": rng.normal(size=7)}


def _batchnorm_loss(y, run_mean, run_var, weights):
  w, a, b = weights
  return (jnp.sum(jnp.sin(y.astype(w.dtype)) * w) + jnp.sum(run_mean * a)
          + jnp.sum(run_var * b))


def _float64_batchnorm_grads(x, weights, params, groups=2):
  with jax.enable_x64(True):
    grads = jax.grad(lambda x, p: _batchnorm_loss(
        *_two_pass_batchnorm(x, p["scale"], p["bias"], groups), weights), argnums=(0, 1))(
            jnp.asarray(x, jnp.float64), jax.tree.map(jnp.asarray, params))
    return jax.tree.map(np.asarray, grads)


def _batchnorm_grads(bn, x, weights, params):
  """jax.grad through our BatchNorm, the running statistics' update included."""
  def loss(x, params):
    y, upd = bn.apply({"params": params, "batch_stats": {"mean": jnp.zeros(7),
                                                         "var": jnp.ones(7)}},
                      x, mutable=["batch_stats"])
    stats = upd["batch_stats"]
    return _batchnorm_loss(y, stats["mean"], stats["var"],
                           jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), weights))
  return jax.grad(loss, argnums=(0, 1))(x, params)


def _relative_errors(got, want):
  return {name: np.abs(np.asarray(g, np.float64) - ref).max() / np.abs(ref).max()
          for name, g, ref in (("x", got[0], want[0]), ("scale", got[1]["scale"], want[1]["scale"]),
                               ("bias", got[1]["bias"], want[1]["bias"]))}


# bfloat16: y is rounded to 8 bits, hence errors of a few 1e-3 to 2e-2 (20 input draws:
# median 1.3e-2, max 2.2e-2 against float64 at the unrounded input); the reference here takes
# the rounded input, and a wrong formula is off by O(1).
@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-2)])
def test_batchnorm_gradient_matches_float64_autodiff(dtype, rtol):
  x, weights, params = _batchnorm_problem()
  x = np.asarray(jnp.asarray(x, dtype), np.float64)  # the input as the layer sees it
  bn = layers.BatchNorm(train=True, groups=2, dtype=dtype)
  got = jax.jit(functools.partial(_batchnorm_grads, bn))(
      jnp.asarray(x, dtype), weights, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params))
  for name, err in _relative_errors(got, _float64_batchnorm_grads(x, weights, params)).items():
    assert err <= rtol, f"d/d{name}: relative error {err:.1e}"


@pytest.mark.parametrize("cast_params", [True, False])
def test_synchronised_batchnorm_gradient_equals_the_whole_batch(devices, cast_params):
  # The train step casts parameters to device-varying (methods.common) and sums the devices'
  # shares itself; other callers differentiate replicated parameters directly.
  x, weights, params = _batchnorm_problem(seed=1, batch=16)
  x = np.asarray(x, np.float32)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  bn = layers.BatchNorm(train=True, groups=2, axis_name="data")
  params32 = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
  w, a, b = weights
  # Per device: one row of each group, so both groups' statistics span all 8 devices.
  per_device = lambda v: v.reshape(2, 8, *v.shape[1:]).swapaxes(0, 1).reshape(v.shape)  # noqa: E731

  def local(xd, wd, params):
    if cast_params:
      params = jax.lax.pcast(params, "data", to="varying")
    # This device's share: its rows of the y term, 1/8 of the statistics' terms.
    return _batchnorm_grads(bn, xd, (wd, a / 8, b / 8), params)

  def step(xd, wd, params):
    gx, gp = local(xd, wd, params)
    if cast_params:
      gp = jax.lax.psum(gp, "data")
    return gx, gp

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                                  out_specs=(P("data"), P())))
  split = lambda v: jax.device_put(per_device(v), jax.NamedSharding(mesh, P("data")))  # noqa: E731
  gx, gp = sharded(split(x), split(w), jax.device_put(params32, jax.NamedSharding(mesh, P())))
  gx = np.asarray(gx).reshape(8, 2, *x.shape[1:]).swapaxes(0, 1).reshape(x.shape)
  want = _float64_batchnorm_grads(x, weights, params)
  for name, err in _relative_errors((gx, gp), want).items():
    assert err <= 1e-5, f"d/d{name}: relative error {err:.1e}"


def test_batchnorm_backward_keeps_only_the_compute_dtype_input():
  # Autodiff of the statistics kept a float32 copy of every bfloat16 input.
  x = jnp.asarray(RNG.normal(size=(4, 8, 8, 16)), jnp.bfloat16)
  bn = layers.BatchNorm(train=True, groups=2, dtype=jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x)
  _, vjp = jax.vjp(lambda x: bn.apply(variables, x, mutable=["batch_stats"])[0], x)
  big = [(r.dtype, r.shape) for r in jax.tree.leaves(vjp) if r.size >= x.size]
  assert big and all(dt == jnp.bfloat16 for dt, _ in big), big


@pytest.mark.parametrize("cls, inputs, groups", [
    (functools.partial(models.DeepLabV3Plus, 6), lambda x, b: (x,), 1),
    # Both views the same and no dropout, so that GLCNet's two BatchNorm groups see one batch.
    (functools.partial(models.GLCNet, embed_dim=16, encoder_dropout=0.0),
     lambda x, b: (x, x, b, b), 2)])
def test_bn_momentum_reaches_every_batchnorm(cls, inputs, groups):
  x = jnp.asarray(RNG.normal(size=(2, 64, 64, 4)).astype(np.float32))
  boxes = jnp.asarray([[[0, 0, 32, 32], [16, 8, 48, 56]]] * 2, jnp.int32)
  stats = {}
  for m in (0.1, 0.9):
    net = _tiny(cls, bn_momentum=m)
    variables = net.init(jax.random.key(0), *inputs(x, boxes), train=False)
    _, upd = net.apply(variables, *inputs(x, boxes), train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})
    stats[m] = (variables["batch_stats"], upd["batch_stats"])

  # After g updates with one batch, running = (1 − m)^g·initial + (1 − (1 − m)^g)·batch: both
  # momenta must give back the same batch statistics in every layer.
  def batch_from(m):
    init, new = stats[m]
    keep = (1 - m) ** groups
    return jax.tree.map(lambda i, n: (n - keep * i) / (1 - keep), init, new)
  leaves = jax.tree_util.tree_leaves_with_path(batch_from(0.1))
  assert len(leaves) > 20
  for (path, a), b in zip(leaves, jax.tree.leaves(batch_from(0.9))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_synchronised_batchnorm_8_devices_equals_1_device(devices):
  net = models.ResNet(depth=18, width=0.125, axis_name="data")
  x = jnp.asarray(RNG.normal(size=(32, 32, 32, 4)).astype(np.float32))
  variables = net.init(jax.random.key(0), x, train=False)

  def run(v, images):
    out, upd = net.apply(v, images, train=True, bn_groups=2, mutable=["batch_stats"])
    return out["layer4"], upd

  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
  # Per device: [2 view-1 rows; 2 view-2 rows], as GLCNet concatenates them.
  views = x.reshape(2, 8, 2, 32, 32, 4).transpose(1, 0, 2, 3, 4, 5).reshape(32, 32, 32, 4)
  sharded = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P(), P("data")),
                                  out_specs=(P("data"), P())))
  y8, st8 = sharded(variables, jax.device_put(views, jax.NamedSharding(mesh, P("data"))))
  y1, st1 = jax.jit(lambda v, i: net.clone(axis_name=None).apply(
      v, i, train=True, bn_groups=2, mutable=["batch_stats"]))(variables, x)
  y8 = np.asarray(y8).reshape(8, 2, 2, *y8.shape[1:]).transpose(1, 0, 2, 3, 4, 5)
  np.testing.assert_allclose(y8.reshape(y1["layer4"].shape), y1["layer4"], rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), st8, st1)


# ---------------------------------------------------------------- networks
def _tiny(cls, **kw):
  """Narrow ResNet-18 variant: cheap to trace, same code paths as ResNet-50 but
  for the block type (the bottleneck is covered by the parameter count and by
  benchmarks/parity_reference.py)."""
  return cls(**{"width": 0.125, "depth": 18, **kw})


def test_glcnet_r50_parameter_count_matches_reference():
  reference = 40_522_464  # T-SS-GLCNet models/GLCNet.py, resnet50, 4 bands, 64-d heads
  v = jnp.zeros((2, 224, 224, 4))
  b = jnp.zeros((2, 4, 4), jnp.int32)
  shapes = jax.eval_shape(lambda: models.GLCNet().init(jax.random.key(0), v, v, b, b,
                                                       train=False))
  ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
  print(f"GLCNet R50 4 bands parameters: ours {ours:,}, reference {reference:,}")
  assert ours == reference


def test_glcnet_shapes_and_ablation_switches():
  net = _tiny(models.GLCNet, embed_dim=16, depth=50)
  v1 = jnp.asarray(RNG.normal(size=(2, 64, 64, 4)).astype(np.float32))
  v2 = v1 * 2.0 + 1.0
  boxes = jnp.asarray([[[0, 0, 16, 16], [8, 8, 40, 48]]] * 2, jnp.int32)
  variables = net.init(jax.random.key(0), v1, v2, boxes, boxes, train=False)
  (o1, o2), _ = net.apply(variables, v1, v2, boxes, boxes, train=True,
                          rngs={"dropout": jax.random.key(3)}, mutable=["batch_stats"])
  assert o1["global"].shape == (2, 16) and o2["local"].shape == (2, 2, 16)
  assert o1["global"].dtype == jnp.float32
  # Ablations drop their branch and its parameters.
  for flag, gone in (("no_global", "global_head"), ("no_local", "decoder")):
    ablated = _tiny(models.GLCNet, embed_dim=16, **{flag: True})
    shapes = jax.eval_shape(lambda: ablated.init(jax.random.key(0), v1, v2, boxes, boxes,
                                                 train=False))
    assert gone not in shapes["params"]
  no_style = _tiny(models.GLCNet, embed_dim=16, no_style=True)
  shapes = jax.eval_shape(lambda: no_style.init(jax.random.key(0), v1, v2, boxes, boxes,
                                                train=False))
  assert shapes["params"]["global_head"]["fc1"]["kernel"].shape == (32, 32)


def test_glcnet_bfloat16_close_to_float32():
  net = _tiny(models.GLCNet, embed_dim=16)
  v1 = jnp.asarray(RNG.normal(size=(2, 64, 64, 4)).astype(np.float32))
  boxes = jnp.asarray([[[0, 0, 32, 32], [16, 8, 48, 56]]] * 2, jnp.int32)
  variables = net.init(jax.random.key(0), v1, v1, boxes, boxes, train=False)
  f32 = net.apply(variables, v1, v1[::-1], boxes, boxes, train=False)
  bf16 = net.clone(dtype=jnp.bfloat16).apply(variables, v1, v1[::-1], boxes, boxes, train=False)
  for a, b in zip(jax.tree.leaves(f32), jax.tree.leaves(bf16)):
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert rel < 2e-2, rel


def _smooth_relu(fn):
  """fn with ReLU as softplus: a ReLU input within rounding of 0 would route a gradient
  differently under two summation orders (see tests/test_steps.py)."""
  def run(*args):
    with mock.patch.object(nn, "relu", jax.nn.softplus):
      return fn(*args)
  return run


def test_conv_impls_give_the_same_values_and_gradients():
  # Its own generator: drawn from the module's, the input depended on which tests ran first.
  v1 = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 4)).astype(np.float32))
  boxes = jnp.asarray([[[0, 0, 32, 32], [16, 8, 48, 56]]] * 2, jnp.int32)
  nets = {impl: _tiny(models.GLCNet, embed_dim=16, conv_impl=impl) for impl in CONV_IMPLS}
  variables = nets["plain"].init(jax.random.key(0), v1, v1, boxes, boxes, train=False)

  def loss(params, net):
    (o1, o2), stats = net.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                v1, v1[::-1] * 0.5, boxes, boxes, train=True,
                                mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return jnp.sum(o1["global"] * o2["global"]) + jnp.sum(jnp.sin(o1["local"])), (o1, stats)

  got = {impl: jax.jit(_smooth_relu(jax.value_and_grad(loss, has_aux=True)), static_argnums=1)(
      variables["params"], net) for impl, net in nets.items()}
  (plain_loss, plain_aux), plain_grad = got["plain"]
  (cpu_loss, cpu_aux), cpu_grad = got["cpu"]
  np.testing.assert_allclose(cpu_loss, plain_loss, rtol=1e-5)
  assert_tree_close(cpu_aux, plain_aux, "outputs and batch_stats")
  # The two kernels sum in different orders, and through a whole backward pass that costs
  # the stem kernel's gradient (a sum over every pixel) up to 1.6e-4 of the tree's norm and
  # BatchNorm's nearly cancelling bias and scale gradients up to 9e-4 of their scale
  # (inputs from seeds 0-3, with autodiff's BatchNorm gradient as with ours); a wrong tap or
  # a missing term is off by O(1).
  assert_tree_close(cpu_grad, plain_grad, "gradient", rtol=5e-4, leaf_rtol=2e-3)


@pytest.mark.parametrize("options", [dict(conv_impl="cpu"), dict(remat="nothing_saveable"),
                                     dict(conv_impl="cpu", remat="dots_saveable")])
def test_kernels_and_remat_keep_the_parameter_tree(options):
  # Checkpoints move between backends (and remat settings) only if the trees are identical.
  v = jnp.zeros((1, 64, 64, 4))
  b = jnp.zeros((1, 2, 4), jnp.int32)

  def tree(**kw):
    net = models.GLCNet(depth=50, width=0.125, embed_dim=16, **kw)
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), v, v, b, b, train=False))
    return jax.tree_util.tree_map_with_path(lambda p, s: (jax.tree_util.keystr(p), s.shape,
                                                          s.dtype), shapes)
  assert tree(**options) == tree()


@pytest.mark.parametrize("remat", ["", "nothing_saveable"])
def test_remat_rematerialises_the_backbone_gradient(remat):
  # Equal values cannot show that remat is on (tests/test_steps.py checks those); the traced
  # gradient does: jax.checkpoint leaves its remat primitive there, one per block.
  x = jnp.zeros((2, 32, 32, 4))
  net = models.ResNet(depth=18, width=0.125, remat=remat)
  variables = jax.eval_shape(lambda: net.init(jax.random.key(0), x, train=False))

  def grad(v):
    def loss(params):
      out, _ = net.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
      return jnp.sum(out["layer4"])
    return jax.grad(loss)(v["params"])
  eqns = jax.make_jaxpr(grad)(variables).jaxpr.eqns
  assert sum(e.primitive.name == "remat2" for e in eqns) == (8 if remat else 0)


def test_unknown_conv_impl_and_remat_are_errors():
  x = jnp.zeros((1, 8, 8, 2))
  with pytest.raises(ValueError, match="conv_impl 'auto'"):
    layers.Conv2d(3, 1, conv_impl="auto").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="remat"):
    models.ResNet(depth=18, width=0.125, remat="save_everything").init(
        jax.random.key(0), x, train=False)


def test_deeplab_and_baselines_shapes():
  x = jnp.zeros((2, 64, 64, 4))
  key = jax.random.key(0)
  deeplab = _tiny(models.DeepLabV3Plus, num_classes=6)
  assert jax.eval_shape(lambda: deeplab.apply(deeplab.init(key, x, train=False), x,
                                              train=False)).shape == (2, 64, 64, 6)
  simclr = _tiny(models.SimCLR)
  z = jax.eval_shape(lambda: simclr.apply(simclr.init(key, x, x, train=False), x, x, train=False))
  assert z[0].shape == (2, 64)
  moco = _tiny(models.MoCoV2)
  assert jax.eval_shape(lambda: moco.apply(moco.init(key, x, train=False), x,
                                           train=False)).shape == (2, 64)
  inpaint = _tiny(models.Inpainting)
  assert jax.eval_shape(lambda: inpaint.apply(inpaint.init(key, x, train=False), x,
                                              train=False)).shape == (2, 64, 64, 4)
  tiles = jnp.zeros((2, 9, 32, 32, 4))
  jig = _tiny(models.Jigsaw, num_permutations=24)
  assert jax.eval_shape(lambda: jig.apply(jig.init(key, tiles, train=False), tiles,
                                          train=False)).shape == (2, 24)


def test_jigsaw_tiles_use_per_position_batch_statistics():
  jig = _tiny(models.Jigsaw, num_permutations=5)
  tiles = jnp.asarray(RNG.normal(size=(3, 9, 32, 32, 4)).astype(np.float32))
  variables = jig.init(jax.random.key(0), tiles, train=False)
  run = jax.jit(functools.partial(jig.apply, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(0)}))
  # Scaling one tile position changes nothing downstream of the first BN for
  # that position (its statistics are its own), so logits are unchanged.
  scaled = tiles.at[:, 4].multiply(7.0)
  a, _ = run(variables, tiles)
  b, _ = run(variables, scaled)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_jigsaw_permutations_are_distinct_and_deterministic():
  perms = models.jigsaw_permutations(30)
  assert perms.shape == (30, 9)
  assert all(sorted(p) == list(range(9)) for p in perms.tolist())
  assert len({tuple(p) for p in perms.tolist()}) == 30
  dist = (perms[:, None] != perms[None]).sum(-1) + 9 * np.eye(30, dtype=int)
  assert dist.min() >= 7  # greedy max-min selection keeps them far apart
  models.jigsaw_permutations.cache_clear()
  np.testing.assert_array_equal(models.jigsaw_permutations(30), perms)


def test_transfer_modes():
  x = jnp.zeros((1, 64, 64, 4))
  b = jnp.zeros((1, 2, 4), jnp.int32)
  glc = _tiny(models.GLCNet, embed_dim=16).init(jax.random.key(1), x, x, b, b, train=False)
  ft_model = _tiny(models.DeepLabV3Plus, num_classes=6)
  fresh = ft_model.init(jax.random.key(2), x, train=False)
  leaf = lambda v, *p: np.asarray(functools.reduce(lambda t, k: t[k], p, v))  # noqa: E731
  for mode, encoder_moved, decoder_moved in (("backbone", False, False),
                                             ("backbone+encoder", True, False),
                                             ("all", True, True)):
    out, names = models.transfer_pretrained(fresh, glc, mode)
    np.testing.assert_array_equal(leaf(out, "params", "backbone", "conv1", "kernel"),
                                  leaf(glc, "params", "backbone", "conv1", "kernel"))
    enc = ("params", "encoder", "conv1", "kernel")
    assert np.array_equal(leaf(out, *enc), leaf(glc, *enc)) == encoder_moved
    dec = ("params", "decoder", "conv2", "kernel")
    assert np.array_equal(leaf(out, *dec), leaf(glc, *dec)) == decoder_moved
    cls = ("params", "decoder", "classifier", "kernel")
    np.testing.assert_array_equal(leaf(out, *cls), leaf(fresh, *cls))
    assert "batch_stats/backbone/bn1/mean" in names
  other_bands = _tiny(models.DeepLabV3Plus, num_classes=6).init(
      jax.random.key(2), jnp.zeros((1, 64, 64, 3)), train=False)
  with pytest.raises(ValueError, match="backbone/conv1/kernel"):
    models.transfer_pretrained(other_bands, glc, "backbone")
  # A backbone alone (imported torchvision weights) under the default mode: say which mode fits.
  backbone_only = {col: {"backbone": tree["backbone"]} for col, tree in glc.items()}
  with pytest.raises(ValueError, match=(
      r"^transfer: the pretrained checkpoint lacks (params|batch_stats)/encoder/.* needed by mode "
      r"'backbone\+encoder'; it holds a backbone alone \(torchvision weights, for one\): set "
      r"init.transfer=backbone$")):
    models.transfer_pretrained(fresh, backbone_only, "backbone+encoder")
