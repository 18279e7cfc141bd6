"""Networks of GLCNet and its baselines (Flax Linen, NHWC, PyTorch numerics).

Every model takes float32 NHWC images and `train: bool`; `axis_name` names
the mesh axis BatchNorm synchronises over (None = per-device batch); `dtype`
is the compute dtype (parameters and BN statistics stay float32). Train mode
needs mutable=['batch_stats'] and, for models with dropout,
rngs={'dropout': key}.

  GLCNet(...)(view1, view2, boxes1, boxes2, train)
      → (out1, out2), out = {'global': (B, 64), 'local': (B, P, 64)}
  SimCLR(...)(view1, view2, train) → (z1, z2), each (B, 64)
  MoCoV2(...)(images, train) → (B, 64)
  Inpainting(...)(images, train) → (B, H, W, bands) in (−1, 1)
  Jigsaw(...)(tiles (B, 9, h, w, bands), train) → (B, num_permutations)
  DeepLabV3Plus(num_classes, ...)(image, train) → (B, H, W, num_classes)

`transfer_pretrained` builds fine-tuning variables from a pretraining
checkpoint; `jigsaw_permutations` gives the jigsaw classes.
"""
from glc_jax.models.baselines import Inpainting, Jigsaw, MoCoV2, SimCLR
from glc_jax.models.deeplab import ASPP, Decoder, DeepLabV3Plus, Encoder
from glc_jax.models.glcnet import GLCNet
from glc_jax.models.heads import ProjectionHead, style_features
from glc_jax.models.layers import (BatchNorm, Conv2d, ConvTranspose2d, Linear,
                                   box_mean_of_upsampled, resize_bilinear_align_corners,
                                   resize_nearest_torch)
from glc_jax.models.permutations import jigsaw_permutations
from glc_jax.models.resnet import ResNet
from glc_jax.models.transfer import TRANSFER_MODES, transfer_pretrained

__all__ = [
    "ASPP", "BatchNorm", "Conv2d", "ConvTranspose2d", "Decoder", "DeepLabV3Plus",
    "Encoder", "GLCNet", "Inpainting", "Jigsaw", "Linear", "MoCoV2", "ProjectionHead",
    "ResNet", "SimCLR", "TRANSFER_MODES", "box_mean_of_upsampled",
    "jigsaw_permutations", "resize_bilinear_align_corners", "resize_nearest_torch",
    "style_features", "transfer_pretrained",
]
