"""The train state and the one train-step skeleton every pretraining method uses.

A method (glc_jax/methods/<name>.py) supplies a model, how to initialise it
and its extra state, and a loss:

    loss(params, state, batch, rng) -> (loss, Aux(batch_stats, extras, metrics))

run on each device's slice of the batch inside `jax.shard_map` over
DATA_AXIS. Losses (glc_jax/losses.py) return the loss of the GLOBAL batch on
every device, and BatchNorm reduces its statistics over DATA_AXIS, so the
step below computes exactly what one device would compute on the whole
batch. Gradients of the replicated parameters are summed across devices by
shard_map itself (the transpose of their implicit broadcast); since each
device differentiates only its own share of the global loss, that sum is the
global gradient, already identical on every device, with no extra pmean.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from glc_jax import parallel
from glc_jax.parallel import DATA_AXIS

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a pretraining step reads and writes; replicated on the mesh.

  step: () int32, number of updates done.
  params, batch_stats: the model's variables (float32).
  opt_state: the optax state of `params`.
  extras: method-specific state, e.g. MoCo's key network and queue (or None).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extras: Any = None


@flax.struct.dataclass
class Aux:
  """What a method's loss returns besides the loss value."""
  batch_stats: Any
  extras: Any
  metrics: Metrics


@dataclasses.dataclass(frozen=True)
class Method:
  """Base of the pretraining methods.

  Attributes:
    model: the Flax module, built with axis_name=DATA_AXIS.
    batch_keys: keys a batch must hold (see the team's batch formats).
  Subclasses implement `init_inputs`, `loss` and, if they carry state beyond
  params / batch_stats, `init_extras`.
  """
  model: nn.Module
  batch_keys: tuple[str, ...] = ()

  def init_inputs(self, batch: Batch) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) for model.init from a one-example batch (train=False)."""
    raise NotImplementedError

  def init_extras(self, rng: jax.Array, params: Any, batch_stats: Any) -> Any:
    """Method state beyond params / batch_stats; None by default."""
    del rng, params, batch_stats
    return None

  def loss(self, params: Any, state: TrainState, batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, Aux]:
    raise NotImplementedError

  def apply_train(self, params: Any, batch_stats: Any, *args,
                  rng: jax.Array) -> tuple[Any, Any]:
    """model.apply in train mode → (outputs, new batch_stats)."""
    out, mutated = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, *args, train=True,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return out, mutated["batch_stats"]

  def check_batch(self, batch: Batch) -> None:
    missing = [k for k in self.batch_keys if k not in batch]
    if missing:
      raise ValueError(f"{type(self).__name__}: batch lacks keys {missing}; "
                       f"it has {sorted(batch)}")


def _one_example(batch: Batch) -> dict[str, jax.Array]:
  return {k: jnp.zeros((1,) + tuple(v.shape[1:]), v.dtype)
          for k, v in batch.items()}


def init_train_state(method: Method, tx: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, rng: jax.Array,
                     example_batch: Batch,
                     variables: Mapping[str, Any] | None = None) -> TrainState:
  """A fresh TrainState (step 0), built under jit straight into replicated arrays.

  Args:
    method: the method.
    tx: its optimiser.
    mesh: the data mesh.
    rng: PRNG key for parameters and extras (same on every process).
    example_batch: arrays or ShapeDtypeStructs with the batch's per-example
      shapes (the leading dimension is ignored).
    variables: optional {'params', 'batch_stats'} to start from (e.g.
      transferred pretraining weights) instead of a random init; host arrays,
      identical on every process.
  """
  method.check_batch(example_batch)
  example = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         dict(example_batch))
  replicated = parallel.replicated_sharding(mesh)
  if variables is not None:
    variables = parallel.replicate(
        {"params": variables["params"],
         "batch_stats": variables.get("batch_stats", {})}, mesh)

  def init(rng, given):
    model_rng, extras_rng = jax.random.split(rng)
    if given is None:
      args, kwargs = method.init_inputs(_one_example(example))
      given = method.model.init(model_rng, *args, train=False, **kwargs)
    params = given["params"]
    batch_stats = given.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params),
        extras=method.init_extras(extras_rng, params, batch_stats))

  shapes = jax.eval_shape(init, rng, variables)
  shardings = jax.tree.map(lambda _: replicated, shapes)
  return jax.jit(init, out_shardings=shardings)(rng, variables)


def make_train_step(method: Method, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array],
                    mesh: jax.sharding.Mesh,
                    ) -> Callable[[TrainState, Batch, jax.Array],
                                  tuple[TrainState, Metrics]]:
  """The jitted, sharded train step `(state, batch, rng) -> (state, metrics)`.

  state: replicated TrainState (donated: do not reuse the one passed in).
  batch: dict of global arrays sharded over DATA_AXIS (parallel.shard_host_batch);
    the global batch must divide by the device count.
  rng: PRNG key, the same on every process; folded with the step and the
    device index inside, so pass the same key every step.
  metrics: dict of replicated float32 scalars: 'loss', the method's loss
    parts, 'lr' (the rate this update used), 'grad_norm' (global L2 norm).
  """
  def step(state: TrainState, batch: Batch, rng: jax.Array):
    method.check_batch(batch)
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                             jax.lax.axis_index(DATA_AXIS))
    def loss(params, *args):
      # The replicated parameters become device-varying here, in float32, so the
      # cross-device gradient sum (this cast's transpose) runs in float32. Left to
      # shard_map, that sum sits where each parameter meets the varying
      # activations, after its cast to the compute dtype: bfloat16 gradients
      # summed over every device.
      return method.loss(jax.lax.pcast(params, DATA_AXIS, to="varying"), *args)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(aux.metrics, loss=loss, lr=schedule(state.step),
                   grad_norm=optax.tree.norm(grads))
    new_state = state.replace(step=state.step + 1, params=params,
                              batch_stats=aux.batch_stats, opt_state=opt_state,
                              extras=aux.extras)
    return new_state, metrics

  sharded = jax.shard_map(
      step, mesh=mesh,
      in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC,
                parallel.REPLICATED_SPEC),
      out_specs=(parallel.REPLICATED_SPEC, parallel.REPLICATED_SPEC))
  replicated = parallel.replicated_sharding(mesh)
  return jax.jit(
      sharded, donate_argnums=(0,),
      in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
      out_shardings=(replicated, replicated))
