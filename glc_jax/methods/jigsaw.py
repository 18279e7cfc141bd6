"""Jigsaw pretraining: classify which permutation shuffled the 3×3 tiles."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class JigsawMethod(Method):
  """Batch: tiles (B, 9, h, w, C) float32 in shuffled order, perm_index (B,)
  int32 (row of glc_jax.models.jigsaw_permutations). Metrics: accuracy."""
  batch_keys: tuple[str, ...] = ("tiles", "perm_index")

  def init_inputs(self, batch: Batch):
    return (batch["tiles"],), {}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    logits, batch_stats = self.apply_train(params, state.batch_stats,
                                           batch["tiles"], rng=rng)
    labels = batch["perm_index"]
    loss = losses.cross_entropy_loss(logits, labels, axis_name=DATA_AXIS)
    hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    accuracy = jax.lax.pmean(jnp.mean(hits), DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=state.extras,
                     metrics={"accuracy": accuracy})
