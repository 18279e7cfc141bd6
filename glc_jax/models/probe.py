"""The online probe's network: a frozen pretrained backbone + encoder and a light segmentation head."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glc_jax.models.deeplab import Decoder, Encoder
from glc_jax.models.layers import Conv2d, resize_bilinear_align_corners
from glc_jax.models.resnet import ResNet

PROBE_HEADS = ("linear", "decoder")


class ProbeSegmenter(nn.Module):
  """Backbone → encoder (ASPP), always in eval mode, → a segmentation head.

  The backbone and encoder have DeepLabV3Plus's structure, which every
  pretraining model here shares, so a pretraining state's 'backbone' and
  'encoder' subtrees (params and batch_stats) are this network's as they are.

  head: 'linear', a 1×1 conv with bias on the encoder output upsampled
  (align-corners) to the input size; the conv runs before the upsampling,
  which gives the same logits because both are linear per pixel and the
  bilinear weights sum to 1. 'decoder': the fine-tuning decoder (low-level
  features from layer1, dropout 0.5 / 0.1 in train mode).

  Methods:
    features(image) → {'encoder': (B, h, w, 256·width), 'low_level':
      (B, H/4, W/4, C) with the decoder head}; no gradient reaches them.
    classify(features, size, train) → (B, *size, num_classes) float32 logits;
      touches only the head's variables ('head').
    __call__(image, train) = classify(features(image), image size, train).
  Parameter tree: {'backbone', 'encoder', 'head'}. Other attributes as in
  DeepLabV3Plus.
  """
  num_classes: int
  head_type: str = "linear"
  depth: int = 50
  output_stride: int = 16
  width: float = 1.0
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  remat: str = ""
  stem_init: str = "kaiming"
  bn_momentum: float = 0.9

  def setup(self):
    if self.head_type not in PROBE_HEADS:
      raise ValueError(f"probe head {self.head_type!r}; expected one of {PROBE_HEADS}")
    self.backbone = ResNet(self.depth, self.output_stride, self.width, self.axis_name,
                           self.dtype, self.conv_impl, self.remat, self.stem_init,
                           self.bn_momentum)
    self.encoder = Encoder(self.output_stride, self.width, axis_name=self.axis_name,
                           dtype=self.dtype, conv_impl=self.conv_impl,
                           bn_momentum=self.bn_momentum)
    if self.head_type == "linear":
      self.head = Conv2d(self.num_classes, 1, use_bias=True, dtype=self.dtype,
                         conv_impl=self.conv_impl)
    else:
      self.head = Decoder(self.num_classes, self.width, (0.5, 0.1), self.axis_name, self.dtype,
                          self.conv_impl, self.bn_momentum)

  def features(self, image: jax.Array) -> dict[str, jax.Array]:
    feats = self.backbone(image, False)
    out = {"encoder": self.encoder(feats["layer4"], False)}
    if self.head_type == "decoder":
      out["low_level"] = feats["layer1"]
    return jax.lax.stop_gradient(out)

  def classify(self, features: dict[str, jax.Array], size: tuple[int, int],
               train: bool) -> jax.Array:
    if self.head_type == "linear":
      logits = self.head(features["encoder"])
    else:
      logits = self.head(features["encoder"], features["low_level"], train)
    return resize_bilinear_align_corners(logits, size).astype(jnp.float32)

  def __call__(self, image: jax.Array, train: bool) -> jax.Array:
    return self.classify(self.features(image), image.shape[1:3], train)
