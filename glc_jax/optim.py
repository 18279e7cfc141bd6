"""Optimisers and learning-rate schedules, the reference's by default.

Config keys (an ml_collections.ConfigDict, usually `config.optimizer`):

  name           'adam' (default; L2 decay added to the gradient, as torch
                 Adam's weight_decay), 'adamw' (decoupled decay), 'lars'.
  lr             learning rate per `reference_batch` examples (pretraining
                 1e-3 per 256, fine-tuning 1e-4 per 16).
  lr_scaling     'batch' (default: lr × global_batch / reference_batch) |
                 'none' (lr as given) | 'devices' (lr × device count).
  reference_batch  the global batch `lr` is meant for (256 for pretraining,
                 16 for fine-tuning).

The learning-rate rule: `data.batch_size` is the global batch (over every
device and host), and the lr is `lr × global_batch / reference_batch`. The
reference trains 256 pairs per GPU at 1e-3 × GPUs, i.e. 1e-3 per 256
examples, so the rule reproduces it on any number of GPUs, and a pod keeps
the same lr per example whatever its size. 'devices' multiplies by the
device count whatever the global batch is (on 64 chips with the same
global batch that is 64× the reference's lr per example); it is kept only
for comparisons with runs that used it.
  b1, b2, eps    Adam moments (0.9, 0.99, 1e-8).
  weight_decay   1e-5.
  momentum       LARS momentum (0.9).
  trust_coefficient  LARS trust coefficient (0.001).
  schedule       'cosine' (to end_lr over the run, torch CosineAnnealingLR),
                 'exponential' (× decay_rate per epoch) or 'constant'.
  end_lr         cosine floor (4e-8).
  decay_rate     per-epoch factor of 'exponential' (0.98).
  per_epoch      True: the lr changes only at epoch boundaries, as the
                 reference's epoch-stepped schedulers do; False: smoothly.
  warmup_epochs  linear warm-up from 0 (may be fractional; 0 = none); the
                 main schedule starts after it.
  grad_clip_norm clip the global gradient norm to this (0 or None = off).

Missing keys take the defaults above (`default_optimizer_config()`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[jax.Array], jax.Array]

_NAMES = ("adam", "adamw", "lars")
_SCHEDULES = ("cosine", "exponential", "constant")
_SCALINGS = ("none", "devices", "batch")
# What each named choice may be, for checks of a config before anything is built.
CHOICES = {"name": _NAMES, "schedule": _SCHEDULES, "lr_scaling": _SCALINGS}


def default_optimizer_config() -> ml_collections.ConfigDict:
  """The reference's pretraining optimiser: Adam, cosine to 4e-8, 1e-3 per 256 examples."""
  return ml_collections.ConfigDict(dict(
      name="adam", lr=1e-3, lr_scaling="batch", reference_batch=256,
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-5, momentum=0.9,
      trust_coefficient=0.001, schedule="cosine", end_lr=4e-8,
      decay_rate=0.98, per_epoch=True, warmup_epochs=0.0,
      grad_clip_norm=0.0))


def finetune_optimizer_config() -> ml_collections.ConfigDict:
  """The reference's fine-tuning optimiser: Adam 1e-4 at batch 16, × 0.98 per epoch."""
  config = default_optimizer_config()
  config.update(lr=1e-4, reference_batch=16, schedule="exponential")
  return config


def _choice(config, key, allowed):
  value = config[key]
  if value not in allowed:
    raise ValueError(f"optimizer.{key} = {value!r}; expected one of {allowed}")
  return value


def scaled_lr(config: ml_collections.ConfigDict, num_devices: int,
              global_batch: int) -> float:
  """Base lr after the configured scaling rule (the module docstring's rule)."""
  scaling = _choice(config, "lr_scaling", _SCALINGS)
  if scaling == "devices":
    return config.lr * num_devices
  if scaling == "batch":
    return config.lr * global_batch / config.reference_batch
  return config.lr


def make_schedule(config: ml_collections.ConfigDict, *, base_lr: float,
                  steps_per_epoch: int, num_epochs: int) -> Schedule:
  """step (int) → learning rate (float32)."""
  if steps_per_epoch <= 0 or num_epochs <= 0:
    raise ValueError(f"steps_per_epoch ({steps_per_epoch}) and num_epochs "
                     f"({num_epochs}) must be positive")
  kind = _choice(config, "schedule", _SCHEDULES)
  warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
  main_epochs = num_epochs - config.warmup_epochs
  if main_epochs <= 0:
    raise ValueError(f"config key optimizer.warmup_epochs is {config.warmup_epochs}; the warm-up "
                     f"must be shorter than the schedule's {num_epochs} epoch"
                     f"{'' if num_epochs == 1 else 's'} of {steps_per_epoch} steps")
  end_lr, decay_rate, per_epoch = config.end_lr, config.decay_rate, config.per_epoch

  def main(epoch):
    if kind == "cosine":
      return end_lr + (base_lr - end_lr) * 0.5 * (
          1 + jnp.cos(math.pi * epoch / main_epochs))
    if kind == "exponential":
      return base_lr * decay_rate ** epoch
    return jnp.full_like(epoch, base_lr)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    epoch = jnp.maximum(step - warmup_steps, 0.0) / steps_per_epoch
    if per_epoch:
      epoch = jnp.floor(epoch)
    lr = main(epoch)
    if warmup_steps:
      lr = jnp.where(step < warmup_steps, base_lr * step / warmup_steps, lr)
    return lr.astype(jnp.float32)
  return schedule


def _decay_mask(params):
  # LARS and AdamW conventionally leave biases and BatchNorm parameters
  # (every 1-D leaf) undecayed and unadapted.
  return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(config: ml_collections.ConfigDict | None, *,
                    steps_per_epoch: int, num_epochs: int, num_devices: int = 1,
                    global_batch: int = 1,
                    ) -> tuple[optax.GradientTransformation, Schedule]:
  """Optimiser and schedule from `config` (keys in the module docstring).

  Returns (tx, schedule); schedule(step) is the lr the tx uses at that step
  (for logging).
  """
  merged = default_optimizer_config()
  if config is not None:
    unknown = set(config.keys()) - set(merged.keys())
    if unknown:
      raise ValueError(f"optimizer: unknown keys {sorted(unknown)}")
    merged.update(config.to_dict() if hasattr(config, "to_dict") else config)
  config = merged
  name = _choice(config, "name", _NAMES)
  base_lr = scaled_lr(config, num_devices, global_batch)
  schedule = make_schedule(config, base_lr=base_lr,
                           steps_per_epoch=steps_per_epoch, num_epochs=num_epochs)
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if name == "adam":
    # torch.optim.Adam: the decay term joins the gradient before the moments.
    parts += [optax.add_decayed_weights(config.weight_decay),
              optax.scale_by_adam(config.b1, config.b2, config.eps),
              optax.scale_by_learning_rate(schedule)]
  elif name == "adamw":
    parts.append(optax.adamw(schedule, config.b1, config.b2, config.eps,
                             weight_decay=config.weight_decay, mask=_decay_mask))
  else:
    parts.append(optax.lars(schedule, weight_decay=config.weight_decay,
                            weight_decay_mask=_decay_mask,
                            trust_coefficient=config.trust_coefficient,
                            trust_ratio_mask=_decay_mask,
                            momentum=config.momentum))
  return optax.chain(*parts), schedule
