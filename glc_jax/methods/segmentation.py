"""Supervised fine-tuning of the segmentation network on labelled tiles."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class SegmentationMethod(Method):
  """Pixel-wise cross-entropy over the labelled pixels of the global batch.

  Batch: image (B, H, W, C) float32, label (B, H, W) int32 with
  `ignore_index` (255) for unlabelled pixels. Metrics: pixel_accuracy over
  the labelled pixels.
  """
  batch_keys: tuple[str, ...] = ("image", "label")
  ignore_index: int = 255

  def init_inputs(self, batch: Batch):
    return (batch["image"],), {}

  def logits(self, params, batch_stats, batch: Batch,
             rng: jax.Array) -> tuple[jax.Array, Any]:
    """(B, H, W, num_classes) logits in train mode and the new batch_stats."""
    return self.apply_train(params, batch_stats, batch["image"], rng=rng)

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    logits, batch_stats = self.logits(params, state.batch_stats, batch, rng)
    labels = batch["label"]
    loss = losses.cross_entropy_loss(logits, labels,
                                     ignore_index=self.ignore_index,
                                     axis_name=DATA_AXIS)
    labelled = labels != self.ignore_index
    hits = jnp.sum((jnp.argmax(logits, -1) == labels) & labelled)
    accuracy = (jax.lax.psum(hits.astype(jnp.float32), DATA_AXIS)
                / jnp.maximum(jax.lax.psum(jnp.sum(labelled), DATA_AXIS), 1))
    return loss, Aux(batch_stats=batch_stats, extras=state.extras,
                     metrics={"pixel_accuracy": accuracy})
