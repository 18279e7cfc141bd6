"""ResNet backbones (torchvision layout) with output stride 16 or 8 by dilation.

Follows the reference's deeplab_utils/ResNet.py: stem 7×7/2 conv + BN + ReLU +
3×3/2 max-pool; four stages with strides and dilations
    OS 16: strides (1, 2, 2, 1), dilations (1, 1, 1, 2)
    OS 8:  strides (1, 2, 1, 1), dilations (1, 1, 2, 4)
where every block of a stage (the first included) uses the stage's dilation in
its 3×3 conv, bottlenecks carry the stride on the 3×3 conv, and the projection
shortcut (1×1 conv, stride, no dilation + BN) exists when the stride or the
channel count changes. Convolutions have no bias and kaiming-normal init.

Parameter names mirror torch's state_dict (`layer1.0.conv1` → `layer1_0/conv1`,
`downsample.0/1` → `downsample_conv/downsample_bn`), which keeps the weight
importer a table of renames.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glc_jax.models.compute import check_remat, remat_policy
from glc_jax.models.layers import (BatchNorm, Conv2d, kaiming_normal, max_pool,
                                   torch_default_kernel)

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
STRIDES_DILATIONS = {16: ((1, 2, 2, 1), (1, 1, 1, 2)), 8: ((1, 2, 1, 1), (1, 1, 2, 4))}
STEM_INITS = ("kaiming", "reference")


def scaled(channels: int, width: float) -> int:
  """Channel count `channels` scaled by the width multiplier (at least 1)."""
  return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
  """Two 3×3 convs (ResNet-18/34); expansion 1."""
  planes: int
  stride: int = 1
  dilation: int = 1
  norm: Any = BatchNorm
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv2d, dtype=self.dtype, conv_impl=self.conv_impl)
    d = self.dilation
    y = conv(self.planes, 3, self.stride, d, d, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, 3, 1, d, d, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = conv(self.planes, 1, self.stride, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class Bottleneck(nn.Module):
  """1×1 → 3×3 (stride, dilation) → 1×1 (×4 channels), torchvision v1.5."""
  planes: int
  stride: int = 1
  dilation: int = 1
  norm: Any = BatchNorm
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv2d, dtype=self.dtype, conv_impl=self.conv_impl)
    d = self.dilation
    out = self.planes * self.expansion
    y = conv(self.planes, 1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.planes, 3, self.stride, d, d, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(out, 1, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.stride, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """ResNet-18/34/50/101 feature extractor for DeepLabv3+.

  Attributes:
    depth: 18, 34 (basic blocks), 50 or 101 (bottlenecks).
    output_stride: 16 or 8.
    width: channel multiplier (1.0 = standard; tests use narrow nets).
    axis_name: mesh axis for synchronised BatchNorm (None = local batch).
    dtype: compute dtype; parameters and BN statistics stay float32.
    conv_impl: 'plain' or 'cpu' convolution and max-pool kernels (see
      glc_jax/models/compute.py); the parameter tree is the same.
    remat: '' (none) or a jax.checkpoint_policies name: every residual block
      is rematerialised under that policy (same values and parameter tree).
    stem_init: 'kaiming' (conv1 kaiming-normal like every conv) or
      'reference' (torch's default U(±1/sqrt(fan_in)) for conv1 when the
      band count is not 3, as the reference's replaced first conv).
    bn_momentum: BatchNorm's running-average momentum, torch's convention
      (running = (1 − m)·running + m·batch); the reference's 0.9 by default.

  __call__(x, train, bn_groups=1) with x (B, H, W, bands) float → dict of
  NHWC features (bn_groups: see BatchNorm.groups):
    'layer1': (B, H/4, W/4, 256·width) [64·width for depth 18/34], the
              decoder's low-level input;
    'layer2': stride 8; 'layer3': stride 16 (OS16) or 8 (OS8);
    'layer4': (B, H/OS, W/OS, 2048·width) [512·width for 18/34].
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
  def __call__(self, x: jax.Array, train: bool,
               bn_groups: int = 1) -> dict[str, jax.Array]:
    if self.depth not in STAGE_BLOCKS:
      raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {self.depth}")
    if self.output_stride not in STRIDES_DILATIONS:
      raise ValueError(f"output_stride must be 8 or 16, got {self.output_stride}")
    block_cls = BasicBlock if self.depth < 50 else Bottleneck
    if check_remat(self.remat):
      block_cls = nn.remat(block_cls, policy=remat_policy(self.remat))
    strides, dilations = STRIDES_DILATIONS[self.output_stride]
    norm = functools.partial(BatchNorm, train=train, groups=bn_groups,
                             torch_momentum=self.bn_momentum, axis_name=self.axis_name,
                             dtype=self.dtype)
    if self.stem_init not in STEM_INITS:
      raise ValueError(f"stem_init must be one of {STEM_INITS}, got {self.stem_init!r}")
    # The reference replaces conv1 when the band count is not 3 and leaves
    # torch's default init on the new layer.
    torch_stem = self.stem_init == "reference" and x.shape[-1] != 3
    x = x.astype(self.dtype)
    x = Conv2d(scaled(64, self.width), 7, 2, 3, dtype=self.dtype, conv_impl=self.conv_impl,
               kernel_init=torch_default_kernel if torch_stem else kaiming_normal,
               name="conv1")(x)
    x = nn.relu(norm(name="bn1")(x))
    x = max_pool(x, 3, 2, 1, self.conv_impl)
    features = {}
    for stage, (n_blocks, stride, dilation) in enumerate(
        zip(STAGE_BLOCKS[self.depth], strides, dilations), start=1):
      planes = scaled(64 * 2 ** (stage - 1), self.width)
      for i in range(n_blocks):
        x = block_cls(planes, stride if i == 0 else 1, dilation, norm=norm, dtype=self.dtype,
                      conv_impl=self.conv_impl, name=f"layer{stage}_{i}")(x)
      features[f"layer{stage}"] = x
    return features
