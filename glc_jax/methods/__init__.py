"""Pretraining and fine-tuning methods behind one registry (model + loss).

Config keys read here (ml_collections.ConfigDict):

  method   'glcnet' | 'glcnet_nostyle' | 'glcnet_noglobal' | 'glcnet_nolocal' |
           'simclr' | 'mocov2' | 'inpainting' | 'jigsaw' (pretraining) |
           'segmentation' (fine-tuning DeepLabv3+)
  model    depth (50; 18/34/101), output_stride (16; 8), width (1.0, channel
           multiplier), embed_dim (64; contrastive methods only), dtype
           ('auto' | 'float32' | 'bfloat16', compute dtype), conv_impl
           ('auto' | 'plain' | 'cpu', convolution kernels), remat ('' | a
           jax.checkpoint_policies name), see glc_jax/models/compute.py;
           stem_init ('kaiming' | 'reference': torch's default init of the
           first conv when the band count is not 3, as the reference);
           bn_momentum (0.9, the reference's; the running-average momentum, in
           torch's convention, of every BatchNorm but the inpainting
           decoder's, which keeps the reference's 0.1; evaluation reads the
           running statistics: with
           batches of a few tiles, 0.9 makes the running statistics those of
           the last batch, and torch's default 0.1 averages over about ten);
           num_permutations (jigsaw, 1000), num_classes (segmentation,
           required).
  loss     optional overrides of the method's loss settings:
           glcnet: temperature 0.5, weight 0.5 (lambda), gather_negatives True;
           simclr: temperature 0.5, gather_negatives True;
           mocov2: temperature 0.07, momentum 0.999, queue_size 2048;
           inpainting: erased_weight 0.99; jigsaw: none;
           segmentation: ignore_index 255.
  optimizer  see glc_jax.optim.

Typical use (train.py):

  mesh = parallel.make_data_mesh()
  method = methods.create_method(config)
  tx, schedule = optim.build_optimizer(config.optimizer, steps_per_epoch=...,
      num_epochs=..., num_devices=mesh.size, global_batch=...)
  state = methods.init_train_state(method, tx, mesh, rng, example_batch)
  # fine-tuning from transferred weights instead of a fresh init:
  #   variables=models.transfer_pretrained(...) → init_train_state(..., variables=variables)
  train_step = methods.make_train_step(method, tx, schedule, mesh)
  for host_batch in loader:
    state, metrics = train_step(state, parallel.shard_host_batch(host_batch, mesh), rng)
"""
from __future__ import annotations

import dataclasses

import ml_collections

from glc_jax import models
from glc_jax.methods.common import (Aux, Method, TrainState, init_train_state,
                                    make_train_step)
from glc_jax.methods.glcnet import GLCNetMethod
from glc_jax.methods.inpainting import InpaintingMethod
from glc_jax.methods.jigsaw import JigsawMethod
from glc_jax.methods.mocov2 import MoCoV2Method
from glc_jax.methods.segmentation import SegmentationMethod
from glc_jax.methods.simclr import SimCLRMethod
from glc_jax.models import compute
from glc_jax.parallel import DATA_AXIS

_GLCNET_ABLATIONS = {
    "glcnet": {},
    "glcnet_nostyle": {"no_style": True},
    "glcnet_noglobal": {"no_global": True},
    "glcnet_nolocal": {"no_local": True},
}
METHOD_NAMES = tuple(_GLCNET_ABLATIONS) + ("simclr", "mocov2", "inpainting",
                                           "jigsaw", "segmentation")
_MODEL_KEYS = ("depth", "output_stride", "width", "embed_dim", "dtype", "conv_impl",
               "remat", "stem_init", "bn_momentum", "num_permutations", "num_classes")


def model_kwargs(config: ml_collections.ConfigDict, embed: bool = False) -> dict:
  """Keyword arguments of a model from `config.model`, 'auto' resolved for this backend.

  embed: keep `embed_dim` (the contrastive methods' models take it).
  """
  model = dict(config.get("model", {}))
  unknown = set(model) - set(_MODEL_KEYS)
  if unknown:
    raise ValueError(f"config.model: unknown keys {sorted(unknown)}")
  model.pop("num_permutations", None)
  model.pop("num_classes", None)
  if not embed:
    model.pop("embed_dim", None)
  return dict(model, dtype=compute.resolve_dtype(model.get("dtype", "auto")),
              conv_impl=compute.resolve_conv_impl(model.get("conv_impl", "auto")),
              remat=compute.check_remat(model.get("remat", "")), axis_name=DATA_AXIS)


def _loss_options(config: ml_collections.ConfigDict, cls: type) -> dict:
  options = dict(config.get("loss", {}))
  allowed = {f.name for f in dataclasses.fields(cls)} - {
      "model", "batch_keys", "embed_dim"}
  unknown = set(options) - allowed
  if unknown:
    raise ValueError(f"config.loss: keys {sorted(unknown)} do not apply to "
                     f"method {config.method!r} (allowed: {sorted(allowed)})")
  return options


def create_method(config: ml_collections.ConfigDict) -> Method:
  """The method named by `config.method`, its model built from `config.model`."""
  name = config.get("method")
  if name not in METHOD_NAMES:
    raise ValueError(f"config.method = {name!r}; expected one of {METHOD_NAMES}")
  if name in _GLCNET_ABLATIONS:
    model = models.GLCNet(**model_kwargs(config, True), **_GLCNET_ABLATIONS[name])
    return GLCNetMethod(model=model, **_loss_options(config, GLCNetMethod))
  if name == "simclr":
    return SimCLRMethod(model=models.SimCLR(**model_kwargs(config, True)),
                        **_loss_options(config, SimCLRMethod))
  if name == "mocov2":
    model = models.MoCoV2(**model_kwargs(config, True))
    return MoCoV2Method(model=model, embed_dim=model.embed_dim,
                        **_loss_options(config, MoCoV2Method))
  if name == "inpainting":
    return InpaintingMethod(model=models.Inpainting(**model_kwargs(config, False)),
                            **_loss_options(config, InpaintingMethod))
  if name == "segmentation":
    num_classes = config.get("model", {}).get("num_classes")
    if not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f"config.model.num_classes = {num_classes!r}; the "
                       "segmentation method needs a positive class count")
    return SegmentationMethod(
        model=models.DeepLabV3Plus(num_classes, **model_kwargs(config, False)),
        **_loss_options(config, SegmentationMethod))
  permutations = config.get("model", {}).get("num_permutations", 1000)
  return JigsawMethod(
      model=models.Jigsaw(num_permutations=permutations,
                          **model_kwargs(config, False)),
      **_loss_options(config, JigsawMethod))


__all__ = ["Aux", "GLCNetMethod", "InpaintingMethod", "JigsawMethod",
           "METHOD_NAMES", "Method", "MoCoV2Method", "SegmentationMethod",
           "SimCLRMethod", "TrainState", "create_method", "init_train_state",
           "make_train_step", "model_kwargs"]
