"""Inpainting pretraining: reconstruct erased blocks of the image."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class InpaintingMethod(Method):
  """The erased pixels are set to 0 (in normalised units, as the reference
  multiplies the normalised image by its keep-mask) before the network sees
  the image; the loss weighs the erased pixels by `erased_weight`.

  Batch: image (B, H, W, C) float32 (unerased), mask (B, H, W) bool (True =
  erased). Metrics: loss_erased, loss_kept.
  """
  batch_keys: tuple[str, ...] = ("image", "mask")
  erased_weight: float = 0.99

  def init_inputs(self, batch: Batch):
    return (batch["image"],), {}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    image, erased = batch["image"], batch["mask"]
    blanked = jnp.where(erased[..., None], 0.0, image)
    prediction, batch_stats = self.apply_train(params, state.batch_stats,
                                               blanked, rng=rng)
    loss, parts = losses.inpainting_loss(prediction, image, erased,
                                         erased_weight=self.erased_weight,
                                         axis_name=DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=state.extras, metrics=parts)
