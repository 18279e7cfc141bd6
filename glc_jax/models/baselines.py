"""Networks of the self-supervised baselines, on the same DeepLabv3+ trunk.

Every network takes depth, output_stride, width, axis_name, dtype, conv_impl
and remat as GLCNet does (glc_jax/models/compute.py for the last three).

Facts from the reference (models/v3p_SimCLR_encoder.py,
v3p_mocov2_encoder_true.py, v3p_inpaiting_encoder.py, v3p_jigsaw_encoder.py):
- SimCLR: backbone → encoder → global average → MLP 256→256→ReLU→64.
- MoCo v2: the same query network (its key network is an EMA copy of the
  whole parameter tree, kept in the train state; the reference averages the
  key head too, so the EMA covers every parameter here).
- Inpainting: backbone → encoder on layer4 → transposed convs back to the
  input size with skip connections from layer3 and layer2 → 7×7 conv with
  bias to the band count → tanh. Its decoder BNs are plain torch BatchNorm2d
  (momentum 0.1) and all its decoder convs have biases and torch's default
  init.
- Jigsaw: each of the 9 tiles through the shared backbone + encoder with its
  own BN statistics (the reference loops over tile positions), 3×3 adaptive
  average pooling, fc5 2304→256 + ReLU + dropout 0.1 per tile, concat (2304)
  → fc6 →1024 + ReLU + dropout 0.1 → classifier over the permutation set.
  (The reference also builds an unused `proj` head; it is omitted.)
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glc_jax.models.deeplab import Encoder
from glc_jax.models.heads import ProjectionHead, style_features
from glc_jax.models.layers import (BatchNorm, Conv2d, ConvTranspose2d, Linear,
                                   adaptive_avg_pool, resize_nearest_torch,
                                   torch_default_kernel)
from glc_jax.models.resnet import ResNet, scaled


class SimCLR(nn.Module):
  """Global-pooled DeepLabv3+ encoder + projection MLP.

  embed(images, train, bn_groups=1): (B, H, W, bands) → (B, embed_dim) float32.
  __call__(view1, view2, train) → (z1, z2), the two views run as one batch
  with separate BN statistics per view (as the reference's two passes).
  Parameter tree: {'backbone', 'encoder', 'head'}.
  """
  depth: int = 50
  output_stride: int = 16
  width: float = 1.0
  embed_dim: int = 64
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  remat: str = ""
  stem_init: str = "kaiming"
  bn_momentum: float = 0.9

  def setup(self):
    self.backbone = ResNet(self.depth, self.output_stride, self.width, self.axis_name,
                           self.dtype, self.conv_impl, self.remat, self.stem_init,
                           self.bn_momentum)
    self.encoder = Encoder(self.output_stride, self.width, axis_name=self.axis_name,
                           dtype=self.dtype, conv_impl=self.conv_impl,
                           bn_momentum=self.bn_momentum)
    self.head = ProjectionHead(scaled(256, self.width), self.embed_dim, self.dtype)

  def embed(self, images: jax.Array, train: bool, bn_groups: int = 1) -> jax.Array:
    x = self.encoder(self.backbone(images, train, bn_groups)["layer4"], train, bn_groups)
    return self.head(style_features(x, use_variance=False).astype(self.dtype))

  def __call__(self, view1: jax.Array, view2: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    b = view1.shape[0]
    z = self.embed(jnp.concatenate([view1, view2], axis=0), train, bn_groups=2)
    return z[:b], z[b:]


class MoCoV2(SimCLR):
  """MoCo v2 query network: __call__(images, train) → (B, embed_dim) float32.

  The key network is the same module applied with the EMA parameters (and its
  own batch_stats) from the train state; normalisation and the queue belong
  to the loss / step.
  """

  def __call__(self, images: jax.Array, train: bool) -> jax.Array:  # pytype: disable=signature-mismatch
    return self.embed(images, train)


class Inpainting(nn.Module):
  """Context-encoder style inpainting network on the DeepLabv3+ trunk.

  __call__(images, train): (B, H, W, bands) float32 (erased pixels already
  blanked by the caller) → reconstruction (B, H, W, bands) float32 in
  (−1, 1) (tanh). Where an upsampled map does not match its skip connection
  (always after decoder4 at OS16), it is resized with torch's `nearest` rule
  to the skip's size, as the reference does.
  Parameter tree: {'backbone', 'encoder', 'decoder4'…'decoder1' (each
  {conv, bn}), 'conv_final'}.
  """
  depth: int = 50
  output_stride: int = 16
  width: float = 1.0
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  remat: str = ""
  stem_init: str = "kaiming"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> jax.Array:
    feats = ResNet(self.depth, self.output_stride, self.width, self.axis_name,
                   self.dtype, self.conv_impl, self.remat, self.stem_init, self.bn_momentum,
                   name="backbone")(images, train)
    x = Encoder(self.output_stride, self.width, axis_name=self.axis_name,
                dtype=self.dtype, conv_impl=self.conv_impl, bn_momentum=self.bn_momentum,
                name="encoder")(feats["layer4"], train)
    norm = functools.partial(BatchNorm, train=train, torch_momentum=0.1,
                             axis_name=self.axis_name, dtype=self.dtype)
    c256, c64 = scaled(256, self.width), scaled(64, self.width)

    def up(name, y, features, k, p, op):
      y = ConvTranspose2d(features, k, 2, p, op, dtype=self.dtype, name=f"{name}_conv")(y)
      return nn.relu(norm(name=f"{name}_bn")(y))

    e2, e3 = feats["layer2"], feats["layer3"]
    d = resize_nearest_torch(up("decoder4", x, c256, 5, 2, 0), e3.shape[1:3])
    d = up("decoder3", jnp.concatenate([d, e3], -1), c256, 5, 2, 1)
    d = resize_nearest_torch(d, e2.shape[1:3])
    d = up("decoder2", jnp.concatenate([d, e2], -1), c256, 3, 1, 1)
    d = up("decoder1", d, c64, 3, 1, 1)
    d = resize_nearest_torch(d, images.shape[1:3])
    y = Conv2d(images.shape[-1], 7, padding=3, use_bias=True, kernel_init=torch_default_kernel,
               dtype=self.dtype, conv_impl=self.conv_impl, name="conv_final")(d)
    return jnp.tanh(y).astype(jnp.float32)


class Jigsaw(nn.Module):
  """Jigsaw-puzzle classifier over a permutation set.

  __call__(tiles, train): tiles (B, T, h, w, bands) float32 with T = 9, in
  shuffled order → logits (B, num_permutations) float32. The tiles are run as
  one batch of B·T with BN statistics per tile position (BatchNorm.groups = T).
  Train mode needs rngs={'dropout': key}.
  Parameter tree: {'backbone', 'encoder', 'fc5', 'fc6', 'classifier'}.
  """
  num_permutations: int = 1000
  depth: int = 50
  output_stride: int = 16
  width: float = 1.0
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  remat: str = ""
  stem_init: str = "kaiming"
  bn_momentum: float = 0.9

  @nn.compact
  def __call__(self, tiles: jax.Array, train: bool) -> jax.Array:
    b, t = tiles.shape[:2]
    # Tile-position-major batch, so group i holds every sample's i-th tile.
    x = jnp.swapaxes(tiles, 0, 1).reshape((t * b,) + tiles.shape[2:])
    feats = ResNet(self.depth, self.output_stride, self.width, self.axis_name,
                   self.dtype, self.conv_impl, self.remat, self.stem_init, self.bn_momentum,
                   name="backbone")(x, train, bn_groups=t)
    x = Encoder(self.output_stride, self.width, axis_name=self.axis_name, dtype=self.dtype,
                conv_impl=self.conv_impl, bn_momentum=self.bn_momentum,
                name="encoder")(feats["layer4"], train, bn_groups=t)
    x = adaptive_avg_pool(x, 3)
    # torch flattens (N, C, 3, 3): channel-major.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(t * b, -1)
    x = nn.relu(Linear(scaled(256, self.width), self.dtype, name="fc5")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    x = jnp.swapaxes(x.reshape(t, b, -1), 0, 1).reshape(b, -1)
    x = nn.relu(Linear(scaled(1024, self.width), self.dtype, name="fc6")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return Linear(self.num_permutations, self.dtype, name="classifier")(x).astype(jnp.float32)
