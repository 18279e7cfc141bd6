"""SimCLR pretraining: NT-Xent on globally pooled embeddings of two views."""
from __future__ import annotations

import dataclasses

import jax

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class SimCLRMethod(Method):
  """Batch: view1, view2 (B, H, W, C) float32.

  Metrics: the collapse signals of losses.embedding_health (*_global).
  """
  batch_keys: tuple[str, ...] = ("view1", "view2")
  temperature: float = 0.5
  gather_negatives: bool = True

  def init_inputs(self, batch: Batch):
    return (batch["view1"], batch["view2"]), {}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    (z1, z2), batch_stats = self.apply_train(
        params, state.batch_stats, batch["view1"], batch["view2"], rng=rng)
    loss = losses.ntxent_loss(z1, z2, temperature=self.temperature,
                              axis_name=DATA_AXIS,
                              gather_negatives=self.gather_negatives)
    health = losses.embedding_health(z1, z2, "global", axis_name=DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=state.extras, metrics=health)
