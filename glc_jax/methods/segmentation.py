"""Supervised fine-tuning: DeepLabv3+ with cross-entropy, on the pretraining step skeleton."""
from __future__ import annotations

import dataclasses

import jax

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class SegmentationMethod(Method):
  """Batch: image (B, H, W, C) float32, label (B, H, W) int32 with `ignore_index`.

  The loss is the mean cross-entropy over the non-ignored pixels of the global
  batch (the reference's CrossEntropyLoss on one GPU).
  """
  batch_keys: tuple[str, ...] = ("image", "label")
  ignore_index: int = 255

  def init_inputs(self, batch: Batch):
    return (batch["image"],), {}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    logits, batch_stats = self.apply_train(params, state.batch_stats, batch["image"], rng=rng)
    loss = losses.cross_entropy_loss(logits, batch["label"], ignore_index=self.ignore_index,
                                     axis_name=DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=state.extras, metrics={})


def make_confusion_step(model, mesh: jax.sharding.Mesh, num_classes: int, ignore_index: int = 255):
  """Jitted (variables, batch) -> (K, K) int32 confusion matrix of the global batch.

  batch: image (B, H, W, C), label (B, H, W), valid (B,) bool (padding rows
  are False and do not count), sharded over DATA_AXIS; variables replicated.
  """
  from glc_jax import metrics, parallel  # pylint: disable=import-outside-toplevel

  def step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    label = jax.numpy.where(batch["valid"][:, None, None], batch["label"], ignore_index)
    return metrics.confusion_matrix_jnp(label, jax.numpy.argmax(logits, -1), num_classes,
                                        ignore_index, axis_name=DATA_AXIS)

  sharded = jax.shard_map(step, mesh=mesh, in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC),
                          out_specs=parallel.REPLICATED_SPEC)
  return jax.jit(sharded)
