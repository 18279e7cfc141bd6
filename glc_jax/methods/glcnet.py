"""GLCNet pretraining: global style + local matched-patch contrast."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class GLCNetMethod(Method):
  """Loss = weight · NT-Xent(global) + (1 − weight) · NT-Xent(local patches).

  The ablations are the model's no_style / no_global / no_local flags.
  Batch: view1, view2 (B, H, W, C) float32; patch_boxes1, patch_boxes2
  (B, P, 4) int32; patch_valid (B, P) bool.
  Metrics: loss_global and / or loss_local; the collapse signals of
  losses.embedding_health for the global and / or local embeddings
  (embed_std_*, cos_pos_*, cos_neg_*); with the local branch,
  patch_valid_fraction, the share of the batch's patches matched in both views.
  """
  batch_keys: tuple[str, ...] = ("view1", "view2", "patch_boxes1",
                                 "patch_boxes2", "patch_valid")
  temperature: float = 0.5
  weight: float = 0.5
  gather_negatives: bool = True

  def init_inputs(self, batch: Batch):
    return (batch["view1"], batch["view2"], batch["patch_boxes1"],
            batch["patch_boxes2"]), {}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    (out1, out2), batch_stats = self.apply_train(
        params, state.batch_stats, batch["view1"], batch["view2"],
        batch["patch_boxes1"], batch["patch_boxes2"], rng=rng)
    loss, parts = losses.glcnet_loss(
        out1.get("global"), out2.get("global"), out1.get("local"),
        out2.get("local"), batch["patch_valid"], weight=self.weight,
        temperature=self.temperature, axis_name=DATA_AXIS,
        gather_negatives=self.gather_negatives)
    metrics = dict(parts)
    if "global" in out1:
      metrics.update(losses.embedding_health(out1["global"], out2["global"], "global",
                                             axis_name=DATA_AXIS))
    if "local" in out1:
      n, p, d = out1["local"].shape
      valid = batch["patch_valid"].reshape(n * p)
      metrics.update(losses.embedding_health(
          out1["local"].reshape(n * p, d), out2["local"].reshape(n * p, d), "local",
          valid=valid, axis_name=DATA_AXIS))
      metrics["patch_valid_fraction"] = jax.lax.pmean(jnp.mean(valid.astype(jnp.float32)),
                                                      DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=state.extras, metrics=metrics)
