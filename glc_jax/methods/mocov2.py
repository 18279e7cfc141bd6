"""MoCo v2 pretraining: momentum key network and a queue of negative keys."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from glc_jax import losses
from glc_jax.methods.common import Aux, Batch, Method, TrainState
from glc_jax.parallel import DATA_AXIS


@dataclasses.dataclass(frozen=True)
class MoCoV2Method(Method):
  """Queries from view1, keys from view2 through the EMA key network.

  As in the reference, the key network (every parameter, heads included) is
  moved towards the query network BEFORE the keys are computed, using the
  query parameters of the start of the step; the key network runs in train
  mode with its own BatchNorm statistics. The step's keys, gathered from all
  devices, then replace the oldest queue entries.

  Metrics: the collapse signals of losses.embedding_health (*_global) of the
  queries against the keys.

  extras: {'key_params', 'key_batch_stats', 'queue' (K, D) unit rows,
  'queue_ptr' () int32}. Batch: view1, view2 (B, H, W, C) float32.

  queue_per_device: the reference's per-GPU queues instead: queue (N, K, D),
  one per device of the mesh (N = jax.device_count(), the stages' mesh), each
  used and fed by its own device alone; queue_size is then each one's length.
  """
  batch_keys: tuple[str, ...] = ("view1", "view2")
  temperature: float = 0.07
  momentum: float = 0.999
  queue_size: int = 2048
  queue_per_device: bool = False
  embed_dim: int = 64

  def init_inputs(self, batch: Batch):
    return (batch["view1"],), {}

  def init_extras(self, rng, params, batch_stats):
    shape = (self.queue_size, self.embed_dim)
    if self.queue_per_device:
      shape = (jax.device_count(),) + shape
    queue = losses.l2_normalize(jax.random.normal(rng, shape, jnp.float32))
    return {"key_params": params, "key_batch_stats": batch_stats,
            "queue": queue, "queue_ptr": jnp.zeros((), jnp.int32)}

  def loss(self, params, state: TrainState, batch: Batch, rng: jax.Array):
    extras = state.extras
    m = self.momentum
    # state.params: the same values as `params`, but replicated, as the key
    # network must stay (`params` is the step's device-varying copy).
    key_params = jax.tree.map(lambda k, q: m * k + (1 - m) * q,
                              extras["key_params"], state.params)
    query_rng, key_rng = jax.random.split(rng)
    q, batch_stats = self.apply_train(params, state.batch_stats, batch["view1"],
                                      rng=query_rng)
    k, key_batch_stats = self.apply_train(
        key_params, extras["key_batch_stats"], batch["view2"], rng=key_rng)
    k = jax.lax.stop_gradient(k)
    queue = extras["queue"]
    if self.queue_per_device:
      queue = losses.own_queue(queue, DATA_AXIS)
    loss = losses.moco_infonce_loss(q, k, queue,
                                    temperature=self.temperature,
                                    axis_name=DATA_AXIS)
    queue, queue_ptr = losses.enqueue_keys(extras["queue"], extras["queue_ptr"],
                                           k, axis_name=DATA_AXIS)
    new_extras = {"key_params": key_params, "key_batch_stats": key_batch_stats,
                  "queue": queue, "queue_ptr": queue_ptr}
    health = losses.embedding_health(q, k, "global", axis_name=DATA_AXIS)
    return loss, Aux(batch_stats=batch_stats, extras=new_extras, metrics=health)
