"""Building blocks with PyTorch semantics: convolution, BatchNorm, resizing.

Everything here works on NHWC arrays. The layers reproduce the numerics of the
torch layers the reference GLCNet is built from (padding, dilation, BatchNorm
statistics, `align_corners=True` bilinear and torch's `nearest` resize), so that
weights imported from the reference give the same outputs.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glc_jax.models.compute import CONV_IMPLS

Dtype = Any

# torch.nn.init.kaiming_normal_ with its defaults (fan_in, gain sqrt(2)), which
# the reference applies to every convolution of the backbone, ASPP and decoder.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
# torch's default for Linear/Conv weights (kaiming_uniform with a=sqrt(5)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
  """torch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _check_conv_impl(conv_impl: str) -> None:
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f"conv_impl {conv_impl!r}: expected one of {list(CONV_IMPLS)} "
                     "('auto' is resolved by glc_jax.models.compute.resolve_conv_impl)")


class Conv2d(nn.Module):
  """2-D convolution with torch's symmetric padding convention.

  Input (B, H, W, Cin) → output (B, H', W', features) with
  H' = floor((H + 2·padding − dilation·(k − 1) − 1) / stride) + 1.
  Kernel layout (k, k, Cin, features); the bias (if any) is torch-initialised.
  conv_impl: 'plain' (lax.conv_general_dilated) or 'cpu' (1×1 convs and
  stride-1 dilated convs as matmuls, which XLA's CPU backend runs faster);
  same values and parameters either way.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = kaiming_normal
  dtype: Dtype = jnp.float32
  conv_impl: str = "plain"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _check_conv_impl(self.conv_impl)
    k = self.kernel_size
    fan_in = k * k * x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    same = self.stride == 1 and k % 2 == 1 and self.padding == self.dilation * (k - 1) // 2
    if self.conv_impl == "plain":
      y = _conv(x, kernel, self.stride, self.padding, self.dilation)
    elif k == 1 and self.padding == 0:
      # A 1×1 conv is a matmul over channels; XLA's CPU backend runs it (and
      # its gradients) much faster as a dot than as a convolution.
      x = x[:, ::self.stride, ::self.stride]
      y = jnp.einsum("bhwc,cf->bhwf", x, kernel[0, 0])
    elif same and self.dilation > 1:
      y = _dilated_same_conv(x, kernel, self.dilation)
    else:
      y = _conv(x, kernel, self.stride, self.padding, self.dilation)
    if self.use_bias:
      bias = self.param("bias", torch_default_bias(fan_in), (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def _conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int, dilation: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _dilated_same_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
  """Stride-1 'same' dilated conv as a sum of per-tap matmuls over the pixels each tap reads.

  Tap (a, b) of a k×k kernel shifts the input by ((a, b) − (k−1)/2)·dilation;
  output pixels whose shifted position falls in the padding get nothing from
  it, so each tap is one matmul over the overlapping window only, and a tap
  whose shift is at least the map size is skipped. At DeepLab's atrous rates
  on small maps (rates 6/12/18 on 8×8 or 14×14) most of a convolution's work
  reads padding; XLA's CPU convolution does all of it, this does none (1.5–6×
  faster, forward and backward). Same sums as the convolution, in a different
  order.
  """
  k = kernel.shape[0]
  half = (k - 1) // 2
  h, w = x.shape[1:3]
  y = None
  for a in range(k):
    for b in range(k):
      dy, dx = (a - half) * dilation, (b - half) * dilation
      if abs(dy) >= h or abs(dx) >= w:
        continue
      y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
      part = jnp.einsum("bhwc,cf->bhwf", x[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx], kernel[a, b])
      part = jnp.pad(part, ((0, 0), (y0, h - y1), (x0, w - x1), (0, 0)))
      y = part if y is None else y + part
  return y


def _pool_windows(x_padded: jax.Array, k: int, stride: int, out_hw: tuple[int, int]):
  """The k·k strided views (B, h', w', C) of a padded input, in row-major tap order."""
  ho, wo = out_hw
  return [x_padded[:, a:a + stride * (ho - 1) + 1:stride, b:b + stride * (wo - 1) + 1:stride]
          for a in range(k) for b in range(k)]


def max_pool(x: jax.Array, k: int, stride: int, padding: int,
             conv_impl: str = "plain") -> jax.Array:
  """torch.nn.MaxPool2d(k, stride, padding) on (B, H, W, C): -inf padding, floor sizes.

  The gradient goes to the first maximum of each window in row-major order,
  as torch's does. conv_impl 'plain' is lax.reduce_window, whose gradient
  (select-and-scatter with a >= comparison) picks that same maximum; 'cpu'
  takes k·k strided views, because XLA's CPU backend runs select-and-scatter
  about 6× slower than that.
  """
  _check_conv_impl(conv_impl)
  if conv_impl == "cpu":
    return _max_pool_strided(x, k, stride, padding)
  return jax.lax.reduce_window(x, np.array(-np.inf, x.dtype), jax.lax.max,
                               (1, k, k, 1), (1, stride, stride, 1),
                               ((0, 0), (padding, padding), (padding, padding), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_strided(x: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
  return _max_pool_fwd(x, k, stride, padding)[0]


def _max_pool_fwd(x, k, stride, padding):
  x_padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                     constant_values=-jnp.inf)
  out_hw = tuple((n - k) // stride + 1 for n in x_padded.shape[1:3])
  windows = _pool_windows(x_padded, k, stride, out_hw)
  y = functools.reduce(jnp.maximum, windows)
  return y, (x_padded, y)


def _max_pool_bwd(k, stride, padding, residuals, g):
  x_padded, y = residuals
  hp, wp = x_padded.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  grad = jnp.zeros_like(x_padded)
  zero = jnp.zeros((), g.dtype)
  span_h, span_w = stride * (y.shape[1] - 1) + 1, stride * (y.shape[2] - 1) + 1
  for i, window in enumerate(_pool_windows(x_padded, k, stride, y.shape[1:3])):
    a, b = divmod(i, k)
    first = (window == y) & ~taken
    taken = taken | first
    # Interior padding puts the window's values back on its strided grid.
    grad = grad + jax.lax.pad(jnp.where(first, g, zero), zero,
                              [(0, 0, 0), (a, hp - a - span_h, stride - 1),
                               (b, wp - b - span_w, stride - 1), (0, 0, 0)])
  return (grad[:, padding:hp - padding, padding:wp - padding],)


_max_pool_strided.defvjp(_max_pool_fwd, _max_pool_bwd)


class ConvTranspose2d(nn.Module):
  """torch.nn.ConvTranspose2d(Cin, features, k, stride, padding, output_padding).

  Output size (H − 1)·stride − 2·padding + k + output_padding. The kernel is
  stored as (k, k, Cin, features) with the same (unflipped) spatial order as
  torch's (Cin, features, k, k) weight, so import is a plain transpose; the
  computation is the equivalent input-dilated convolution with the kernel
  flipped.
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  output_padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    # torch computes the fan-in of a transposed-conv weight from its dim 1.
    fan_in = self.features * k * k
    kernel = self.param(
        "kernel", nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform",
                                                   in_axis=-1, out_axis=-2),
        (k, k, x.shape[-1], self.features), jnp.float32)
    lo = k - 1 - self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel[::-1, ::-1].astype(self.dtype),
        window_strides=(1, 1), padding=[(lo, lo + self.output_padding)] * 2,
        lhs_dilation=(self.stride, self.stride),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      bias = self.param("bias", torch_default_bias(fan_in), (self.features,),
                        jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class Linear(nn.Module):
  """torch.nn.Linear with torch's default initialisation; kernel (Cin, features)."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", torch_default_kernel, (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", torch_default_bias(x.shape[-1]), (self.features,),
                      jnp.float32)
    return x.astype(self.dtype) @ kernel.astype(self.dtype) + bias.astype(self.dtype)


class BatchNorm(nn.Module):
  """BatchNorm over (B, H, W) with torch / SyncBN semantics.

  Training: normalises with the batch mean and the biased batch variance; the
  running statistics follow torch's convention
      running = (1 − torch_momentum)·running + torch_momentum·batch,
  with the UNBIASED variance n/(n−1)·var going into the running variance. The
  reference builds every BN of the DeepLab with momentum 0.9
  (`bn_momentum=0.9`), i.e. running = 0.1·running + 0.9·batch. With
  `axis_name` set (inside `jax.shard_map`), sums and counts are reduced over
  that mesh axis, so the statistics are those of the global batch, as with
  SyncBN. Statistics are computed in float32 whatever the compute dtype.

  `groups` > 1 splits the batch into that many equal, consecutive groups
  (group-major: rows [g·b, (g+1)·b)) that are normalised with their own
  statistics, and updates the running statistics once per group in order.
  This equals calling the layer on each group in turn, which is what the
  reference does when it pushes GLCNet's two views (or jigsaw's nine tiles)
  through the network one after the other, while letting us run them as one
  batch.

  Eval: uses the running statistics. Variables: params {scale, bias},
  batch_stats {mean, var}; eps 1e-5 as in torch.
  """
  train: bool = False
  torch_momentum: float = 0.9
  epsilon: float = 1e-5
  groups: int = 1
  axis_name: str | None = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    g = self.groups
    if x.shape[0] % g:
      raise ValueError(f"BatchNorm: batch {x.shape[0]} does not split into {g} groups")
    xg = x.reshape((g, x.shape[0] // g) + x.shape[1:])
    if self.train:
      y, mean, var, n = _batch_norm_train(xg, scale, bias, self.epsilon, self.axis_name,
                                          self.dtype)
      if not self.is_initializing():
        m = self.torch_momentum
        unbiased = var * (n / jnp.maximum(n - 1.0, 1.0))
        for i in range(g):
          ra_mean.value = (1.0 - m) * ra_mean.value + m * mean[i]
          ra_var.value = (1.0 - m) * ra_var.value + m * unbiased[i]
      return y.reshape(x.shape)
    y = _normalise(xg, jnp.broadcast_to(ra_mean.value, (g, c)),
                   jnp.broadcast_to(ra_var.value, (g, c)), scale, bias, self.epsilon, self.dtype)
    return y.reshape(x.shape)


def _normalise(xg, mean, var, scale, bias, epsilon, dtype):
  """(x − mean)·rsqrt(var + ε)·scale + bias in `dtype`; statistics (g, C) in float32."""
  stat_shape = (xg.shape[0],) + (1,) * (xg.ndim - 2) + (xg.shape[-1],)
  mul = jax.lax.rsqrt(var + epsilon) * scale
  return ((xg - mean.reshape(stat_shape).astype(dtype))
          * mul.reshape(stat_shape).astype(dtype) + bias.astype(dtype))


def _group_sums(v: jax.Array, axis_name: str | None) -> jax.Array:
  """Per-group, per-channel sums of (g, b, H, W, C) over (b, H, W) and the mesh axis."""
  total = jnp.sum(v, tuple(range(1, v.ndim - 1)))
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _group_count(xg: jax.Array, axis_name: str | None) -> jax.Array:
  n = jnp.asarray(np.prod(xg.shape[1:-1]), jnp.float32)
  return n if axis_name is None else jax.lax.psum(n, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _batch_norm_train(xg, scale, bias, epsilon, axis_name, dtype):
  """Training BatchNorm of grouped input xg (g, b, H, W, C).

  Returns (y, mean, var, n): the output in `dtype`, the groups' batch mean and
  biased variance (g, C) in float32, two passes (mean, then centred squares)
  for float32 accuracy, and the count n per group, all summed over
  `axis_name` when set.

  The gradient is written out (a custom VJP) rather than left to autodiff,
  which differentiates both statistics passes and keeps a float32 copy of the
  input: here the backward pass is one pair of sums over (gy, x − mean) and
  one elementwise pass, summed over the mesh in float32, and only x in the
  compute dtype is kept. On an H200 BatchNorm's reductions were a quarter of
  GLCNet's step (docs/benchmarks.md).
  """
  return _batch_norm_train_fwd(xg, scale, bias, epsilon, axis_name, dtype)[0]


def _batch_norm_train_fwd(xg, scale, bias, epsilon, axis_name, dtype):
  xf = xg.astype(jnp.float32)
  n = _group_count(xg, axis_name)
  mean = _group_sums(xf, axis_name) / n
  stat_shape = mean.shape[:1] + (1,) * (xg.ndim - 2) + mean.shape[1:]
  var = _group_sums(jnp.square(xf - mean.reshape(stat_shape)), axis_name) / n
  y = _normalise(xg, mean, var, scale, bias, epsilon, dtype)
  return (y, mean, var, n), (xg, mean, var, n, scale)


def _varies(x: jax.Array, axis_name: str | None, unknown: bool) -> bool:
  """Whether `x` differs between the devices of `axis_name` (shard_map's type of it);
  `unknown` where this jax names that type in neither way known here."""
  if axis_name is None:
    return False
  aval = jax.typeof(x)
  # jax 0.10 (the version pinned) keeps the set in `manual_axis_type.varying`; the
  # documentation of other versions calls it `vma`.
  varying = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  if varying is None:
    varying = getattr(aval, "vma", None)
  return unknown if varying is None else axis_name in varying


def _batch_norm_train_bwd(epsilon, axis_name, dtype, residuals, cotangents):
  del dtype
  xg, mean, var, n, scale = residuals
  gy, g_mean, g_var, _ = cotangents
  gy = gy.astype(jnp.float32)
  stat_shape = mean.shape[:1] + (1,) * (xg.ndim - 2) + mean.shape[1:]
  per = lambda v: v.reshape(stat_shape)  # noqa: E731
  axes = tuple(range(1, xg.ndim - 1))
  xc = xg.astype(jnp.float32) - per(mean)  # centred, so no sum below cancels
  rstd = jax.lax.rsqrt(var + epsilon)
  local_gy = jnp.sum(gy, axes)
  local_gy_xc = jnp.sum(gy * xc, axes)
  total = lambda v: v if axis_name is None else jax.lax.psum(v, axis_name)  # noqa: E731
  sum_gy, sum_gy_xc = total((local_gy, local_gy_xc))
  # The statistics' own cotangents (zero when, as in training, they only feed the running
  # averages, hence unknown=False) are summed over the devices whose inputs they depend on.
  g_mean, g_var = (total(g) if _varies(g, axis_name, unknown=False) else g
                   for g in (g_mean, g_var))
  # gx = rstd·scale·(gy − Σgy/n − x̂·Σ(gy·x̂)/n) + g_mean/n + 2·xc·g_var/n with
  # x̂ = xc·rstd, as a·gy + b·xc + c per channel.
  a = rstd * scale
  b = (2.0 * g_var - a * jnp.square(rstd) * sum_gy_xc) / n
  c = (g_mean - a * sum_gy) / n
  gx = per(a) * gy + per(b) * xc + per(c)
  g_scale, g_bias = jnp.sum(local_gy_xc * rstd, 0), jnp.sum(local_gy, 0)
  if axis_name is not None and not _varies(scale, axis_name, unknown=True):
    # Parameters replicated rather than cast to device-varying (methods.common casts them, so
    # that the cast's transpose sums the devices' shares, hence unknown=True) need the summed
    # gradient here.
    g_scale, g_bias = total((g_scale, g_bias))
  return gx.astype(xg.dtype), g_scale, g_bias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _align_corners_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices (i0, i1) and weight of i1 for align_corners=True."""
  if n_out == 1:
    src = np.zeros((1,), np.float64)
  else:
    src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  return i0, i1, (src - i0).astype(np.float32)


def align_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) float32 matrix A with resize(x) = A @ x along one axis."""
  i0, i1, w = _align_corners_taps(n_in, n_out)
  a = np.zeros((n_out, n_in), np.float32)
  rows = np.arange(n_out)
  np.add.at(a, (rows, i0), 1.0 - w)
  np.add.at(a, (rows, i1), w)
  return a


def resize_bilinear_align_corners(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """torch F.interpolate(mode='bilinear', align_corners=True) on NHWC input.

  x: (B, h, w, C) → (B, H, W, C), same dtype. Separable gather + lerp (rows,
  then columns), exact in the compute dtype; no matmul precision involved.
  """
  for axis, n_out in ((1, size[0]), (2, size[1])):
    if x.shape[axis] != n_out:
      x = _resize_axis(x, axis, x.shape[axis], n_out)
  return x


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _resize_axis(x: jax.Array, axis: int, n_in: int, n_out: int) -> jax.Array:
  """The align-corners resize of `x` along `axis`, from n_in (its size) to n_out.

  Its gradient is written out because autodiff's, the transpose of the two
  gathers, is two scatter-adds, which a GPU runs with atomics in the compute
  dtype (4.1 ms of GLCNet's 82-ms step on an H200, docs/benchmarks.md). The
  transpose of the (n_out, n_in) interpolation matrix is a small matmul
  instead, summed in float32.
  """
  i0, i1, w = _align_corners_taps(n_in, n_out)
  shape = [1] * x.ndim
  shape[axis] = n_out
  w = jnp.asarray(w, x.dtype).reshape(shape)
  x0 = jnp.take(x, jnp.asarray(i0), axis=axis)
  x1 = jnp.take(x, jnp.asarray(i1), axis=axis)
  return x0 + (x1 - x0) * w


def _resize_axis_fwd(x, axis, n_in, n_out):
  return _resize_axis(x, axis, n_in, n_out), None


def _resize_axis_bwd(axis, n_in, n_out, _, g):
  a = jnp.asarray(align_corners_matrix(n_in, n_out))
  gx = jnp.moveaxis(jnp.tensordot(g.astype(jnp.float32), a, axes=((axis,), (0,)),
                                  precision=jax.lax.Precision.HIGHEST), -1, axis)
  return (gx.astype(g.dtype),)


_resize_axis.defvjp(_resize_axis_fwd, _resize_axis_bwd)


def resize_nearest_torch(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """torch F.interpolate(mode='nearest') on NHWC: src = floor(dst·in/out)."""
  for axis, n_out in ((1, size[0]), (2, size[1])):
    n_in = x.shape[axis]
    if n_in != n_out:
      idx = np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int32)
      x = jnp.take(x, jnp.asarray(np.minimum(idx, n_in - 1)), axis=axis)
  return x


def adaptive_avg_pool(x: jax.Array, out_size: int) -> jax.Array:
  """torch AdaptiveAvgPool2d((s, s)) on NHWC: bin i spans
  [floor(i·n/s), ceil((i+1)·n/s)). (B, H, W, C) → (B, s, s, C)."""
  def pool_matrix(n: int) -> np.ndarray:
    m = np.zeros((out_size, n), np.float32)
    for i in range(out_size):
      lo, hi = (i * n) // out_size, -((-(i + 1) * n) // out_size)
      m[i, lo:hi] = 1.0 / (hi - lo)
    return m
  ph = jnp.asarray(pool_matrix(x.shape[1]), x.dtype)
  pw = jnp.asarray(pool_matrix(x.shape[2]), x.dtype)
  return jnp.einsum("ih,jw,bhwc->bijc", ph, pw, x,
                    precision=jax.lax.Precision.HIGHEST)


def box_mean_of_upsampled(features: jax.Array, boxes: jax.Array,
                          size: Sequence[int]) -> jax.Array:
  """Mean of the align-corners upsampled feature map inside each box.

  Equals resize_bilinear_align_corners(features, size) averaged over
  [y0, y1) × [x0, x1), but never builds the full-resolution map: upsampling is
  linear and separable, so the box mean is r_y · F · r_x with r_y the mean of
  the interpolation matrix's rows inside the box (likewise r_x).

  features: (B, h, w, C); boxes: (B, P, 4) int (y0, x0, y1, x1), half-open, in
  the coordinates of the (H, W) = `size` map. Returns (B, P, C) float32. Empty
  boxes give 0.
  """
  out_h, out_w = size
  boxes = boxes.astype(jnp.int32)
  ah = jnp.asarray(align_corners_matrix(features.shape[1], out_h))
  aw = jnp.asarray(align_corners_matrix(features.shape[2], out_w))
  ys, xs = jnp.arange(out_h), jnp.arange(out_w)
  my = ((ys >= boxes[..., 0:1]) & (ys < boxes[..., 2:3])).astype(jnp.float32)
  mx = ((xs >= boxes[..., 1:2]) & (xs < boxes[..., 3:4])).astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  ry = jnp.einsum("bpy,yh->bph", my, ah, precision=hi)
  rx = jnp.einsum("bpx,xw->bpw", mx, aw, precision=hi)
  area = jnp.sum(my, -1) * jnp.sum(mx, -1)
  sums = jnp.einsum("bph,bpw,bhwc->bpc", ry, rx, features.astype(jnp.float32),
                    precision=hi)
  return sums / jnp.maximum(area, 1.0)[..., None]
