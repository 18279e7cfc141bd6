"""GLCNet pretraining network (the reference's models/GLCNet.py, self_mode 1/11/12/13)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glc_jax.models.deeplab import Decoder, Encoder
from glc_jax.models.heads import ProjectionHead, style_features
from glc_jax.models.layers import box_mean_of_upsampled
from glc_jax.models.resnet import ResNet, scaled


class GLCNet(nn.Module):
  """DeepLabv3+ with a global style head and a local patch head.

  Per view: backbone → encoder (ASPP, 256 ch, dropout 0.5 in training) →
  - global branch (unless no_global): style vector concat(mean, unbiased
    variance) over space of the encoder output (mean only if no_style) →
    `global_head` MLP 512→256→ReLU→embed_dim (256→256→embed_dim for no_style);
  - local branch (unless no_local): decoder (no dropout) to embed_dim channels,
    upsampled align-corners to the view size, averaged inside each patch box
    → `local_head` MLP embed_dim→embed_dim→ReLU→embed_dim.
  The two views are run as one batch but with separate BatchNorm statistics
  per view (BatchNorm.groups = 2), exactly as the reference's two successive
  passes, running statistics updated view 1 then view 2.

  Attributes: depth (18/34/50/101), output_stride (16/8), width (channel
  multiplier), embed_dim (64), no_style / no_global / no_local (ablations),
  encoder_dropout (0.5 as the reference; 0 only for numerical comparisons),
  axis_name (synchronised BN over this mesh axis), dtype (compute dtype;
  parameters, BN statistics and the returned embeddings are float32),
  conv_impl ('plain' / 'cpu' kernels) and remat (backbone rematerialisation
  policy or ''), see glc_jax/models/compute.py.

  Parameter tree: {'backbone', 'encoder', 'decoder' (unless no_local),
  'global_head' (unless no_global), 'local_head' (unless no_local)}.
  Train mode needs rngs={'dropout': key} and mutable=['batch_stats'].
  """
  depth: int = 50
  output_stride: int = 16
  width: float = 1.0
  embed_dim: int = 64
  no_style: bool = False
  no_global: bool = False
  no_local: bool = False
  encoder_dropout: float = 0.5
  axis_name: str | None = None
  dtype: Any = jnp.float32
  conv_impl: str = "plain"
  remat: str = ""
  stem_init: str = "kaiming"
  bn_momentum: float = 0.9

  def setup(self):
    if self.no_global and self.no_local:
      raise ValueError("GLCNet: no_global and no_local together leave no loss")
    self.backbone = ResNet(self.depth, self.output_stride, self.width, self.axis_name,
                           self.dtype, self.conv_impl, self.remat, self.stem_init,
                           self.bn_momentum)
    self.encoder = Encoder(self.output_stride, self.width, self.encoder_dropout,
                           axis_name=self.axis_name, dtype=self.dtype, conv_impl=self.conv_impl,
                           bn_momentum=self.bn_momentum)
    if not self.no_local:
      self.decoder = Decoder(self.embed_dim, self.width, axis_name=self.axis_name,
                             dtype=self.dtype, conv_impl=self.conv_impl,
                             bn_momentum=self.bn_momentum)
      self.local_head = ProjectionHead(self.embed_dim, self.embed_dim, self.dtype)
    if not self.no_global:
      self.global_head = ProjectionHead(scaled(256, self.width), self.embed_dim,
                                        self.dtype)

  def embed(self, images: jax.Array, boxes: jax.Array | None, train: bool,
            bn_groups: int = 1) -> dict[str, jax.Array]:
    """Embeddings of a batch of views.

    images: (B, H, W, bands) float32; boxes: (B, P, 4) int32 half-open
    (y0, x0, y1, x1) in view pixels (ignored / may be None when no_local).
    Returns {'global': (B, embed_dim) float32} unless no_global and
    {'local': (B, P, embed_dim) float32} unless no_local. Intermediate maps
    are sown into the 'intermediates' collection (backbone_low, backbone_high,
    encoder_out, decoder_out; decoder before upsampling) for inspection.
    """
    feats = self.backbone(images, train, bn_groups)
    x = self.encoder(feats["layer4"], train, bn_groups)
    self.sow("intermediates", "backbone_low", feats["layer1"])
    self.sow("intermediates", "backbone_high", feats["layer4"])
    self.sow("intermediates", "encoder_out", x)
    out = {}
    if not self.no_global:
      out["global"] = self.global_head(
          style_features(x, use_variance=not self.no_style).astype(self.dtype))
    if not self.no_local:
      if boxes is None:
        raise ValueError("GLCNet.embed: boxes are required unless no_local")
      dense = self.decoder(x, feats["layer1"], train, bn_groups)
      self.sow("intermediates", "decoder_out", dense)
      pooled = box_mean_of_upsampled(dense, boxes, images.shape[1:3])
      out["local"] = self.local_head(pooled.astype(self.dtype))
    return out

  def __call__(self, view1: jax.Array, view2: jax.Array,
               boxes1: jax.Array | None, boxes2: jax.Array | None,
               train: bool) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Both views → (out1, out2), each as `embed` returns for one view.

    view1, view2: (B, H, W, bands) float32; boxes1, boxes2: (B, P, 4) int32
    (matched patch i of view 1 ↔ patch i of view 2). The global loss pairs
    out1['global'] with out2['global']; the local loss pairs
    out1['local'] with out2['local'] (flatten to (B·P, D), mask with
    patch_valid).
    """
    b = view1.shape[0]
    images = jnp.concatenate([view1, view2], axis=0)
    boxes = None if self.no_local else jnp.concatenate([boxes1, boxes2], axis=0)
    out = self.embed(images, boxes, train, bn_groups=2)
    return ({k: v[:b] for k, v in out.items()}, {k: v[b:] for k, v in out.items()})
