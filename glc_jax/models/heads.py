"""Projection heads and the pooled statistics they consume."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glc_jax.models.layers import Linear


class ProjectionHead(nn.Module):
  """Linear → ReLU → Linear (torch `nn.Sequential(Linear, ReLU, Linear)`).

  (..., Cin) → (..., out_dim) float32. Parameter names fc1 / fc2 correspond
  to the reference's `proj.0` / `proj.2` (and `proj1.0` / `proj1.2`).
  """
  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(Linear(self.hidden_dim, self.dtype, name="fc1")(x))
    return Linear(self.out_dim, self.dtype, name="fc2")(x).astype(jnp.float32)


def style_features(x: jax.Array, use_variance: bool = True) -> jax.Array:
  """GLCNet's "style" vector of a feature map, in float32.

  x: (B, h, w, C) → (B, 2C) = concat(spatial mean, spatial variance with the
  unbiased N−1 divisor, as torch.var), or (B, C) = the mean alone when
  `use_variance` is False (the noStyle ablation; SimCLR / MoCo pooling).
  """
  xf = x.astype(jnp.float32).reshape(x.shape[0], -1, x.shape[-1])
  mean = jnp.mean(xf, axis=1)
  if not use_variance:
    return mean
  var = jnp.var(xf, axis=1, ddof=1)
  return jnp.concatenate([mean, var], axis=-1)
