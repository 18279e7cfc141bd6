"""How a model computes on a backend: compute dtype, convolution kernels, rematerialisation.

The config keys `model.dtype`, `model.conv_impl` and `model.remat` are names;
the functions here turn them into what the modules take, once, when a model
is built from its config (never inside traced code). "auto" is resolved from
`jax.default_backend()` at that moment, so a step compiled ahead of time for
another platform (a TPU topology lowered on a CPU host) must name its choices
explicitly.

  dtype      'auto' (bfloat16 on GPU/TPU, float32 on CPU) | 'float32' |
             'bfloat16': the compute dtype; parameters, BatchNorm statistics,
             losses and optimiser state stay float32 whatever it is.
  conv_impl  'auto' ('cpu' on CPU, 'plain' elsewhere) | 'plain' | 'cpu':
             'plain' runs every convolution as lax.conv_general_dilated and
             the max-pool as reduce_window; 'cpu' uses the rewrites of
             glc_jax/models/layers.py that XLA's CPU backend runs faster (1×1
             convs as matmuls, stride-1 dilated convs as per-tap matmuls, the
             max-pool as strided views) but that cost ~40% more memory on TPU.
             Both give the same values and the same parameter tree.
  remat      '' or 'none' (keep every activation) | the name of a
             jax.checkpoint_policies policy (e.g. 'nothing_saveable',
             'dots_saveable'): each backbone block is rematerialised under it,
             trading recomputation in the backward pass for activation memory.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONV_IMPLS = ("plain", "cpu")
NO_REMAT = ("", "none")
# The jax.checkpoint_policies that are policies themselves (the others build one from names).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "everything_saveable")


def resolve_dtype(name: str) -> Any:
  """The compute dtype named by `model.dtype` ('auto', 'float32' or 'bfloat16')."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if name not in DTYPES:
    raise ValueError(f"config.model.dtype = {name!r}; expected 'auto' or one of {sorted(DTYPES)}")
  return DTYPES[name]


def resolve_conv_impl(name: str) -> str:
  """'plain' or 'cpu', from `model.conv_impl` ('auto', 'plain' or 'cpu')."""
  if name == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "plain"
  if name not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl = {name!r}; expected 'auto' or one of "
                     f"{list(CONV_IMPLS)}")
  return name


def check_remat(name: str) -> str:
  """`model.remat` checked: '' for none, else one of REMAT_POLICIES."""
  if name in NO_REMAT:
    return ""
  if name not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat = {name!r}; expected '' / 'none' or one of "
                     f"{list(REMAT_POLICIES)}")
  return name


def remat_policy(name: str) -> Callable[..., bool]:
  """The jax.checkpoint policy of a name check_remat accepted (not '')."""
  return getattr(jax.checkpoint_policies, name)
