"""FLOP counts of jitted computations, for model FLOP utilisation (MFU).

Two counts:
- `analytic_flops(fn, *args)`: 2·MACs of every convolution and matmul in the
  traced computation (sub-computations included, scan bodies × trip count),
  independent of backend and fusion. This is the usual MFU numerator: pass
  the whole train step (forward + backward) and divide by step time and peak
  FLOP/s. Elementwise work (BN, ReLU, optimiser) is ignored (<1% for ResNets).
- `compiled_flops(fn, *args)`: what XLA's cost analysis of the compiled
  executable reports for this backend (includes elementwise ops; after
  optimisations; may be absent on some backends → None).

Example (the GLCNet step helper would do the same with its step function):
    flops = analytic_flops(train_step, state, batch, rng)
    mfu = flops / step_seconds / peak_flops_per_second
A ResNet-50 GLCNet step at 224×224 costs ≈150 GFLOP per view pair
(SPEC §2).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np


def _conv_flops(eqn) -> float:
  out_shape = eqn.outvars[0].aval.shape
  rhs_shape = eqn.invars[1].aval.shape
  dn = eqn.params["dimension_numbers"]
  rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, *spatial dims)
  window = np.prod([rhs_shape[d] for d in rhs_spec[2:]])
  return 2.0 * float(np.prod(out_shape)) * float(window) * float(rhs_shape[rhs_spec[1]])


def _dot_flops(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs_shape = eqn.invars[0].aval.shape
  contracted = np.prod([lhs_shape[d] for d in lhs_contract])
  return 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(contracted)


def _sub_jaxprs(params: dict[str, Any]):
  for value in params.values():
    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "conv_general_dilated":
      total += _conv_flops(eqn)
    elif name == "dot_general":
      total += _dot_flops(eqn)
    elif name == "cond":
      total += max(_jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
    else:
      inner = sum(_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params))
      total += inner * (eqn.params["length"] if name == "scan" else 1)
  return total


def analytic_flops(fn: Callable[..., Any], *args, **kwargs) -> float:
  """2·MACs of all convolutions and matmuls of fn(*args, **kwargs).

  Traces only (no compilation, no device work); `args` may be
  jax.ShapeDtypeStruct. Inside `jax.shard_map` the count is per device.
  """
  closed = jax.make_jaxpr(fn)(*args, **kwargs)
  return _jaxpr_flops(closed.jaxpr)


def compiled_flops(fn: Callable[..., Any], *args, **kwargs) -> float | None:
  """FLOPs from XLA's cost analysis of jax.jit(fn) compiled for `args`.

  Returns None when the backend reports no 'flops' entry.
  """
  analysis = jax.jit(fn).lower(*args, **kwargs).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return None if flops is None or flops < 0 else float(flops)
