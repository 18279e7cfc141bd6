"""Optimiser and schedules against numpy transcriptions of torch's formulas."""
import importlib.util
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from glc_jax import optim


def torch_adam_oracle(params, grads_seq, lr_seq, b1, b2, eps, wd):
  """torch.optim.Adam (weight_decay as L2 on the gradient), float64."""
  p = params.astype(np.float64)
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  for t, (g, lr) in enumerate(zip(grads_seq, lr_seq), start=1):
    g = g + wd * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps
    p = p - lr / (1 - b1 ** t) * m / denom
  return p


def test_adam_matches_torch_semantics():
  rng = np.random.default_rng(0)
  params = rng.normal(size=(5, 3)).astype(np.float32)
  grads = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(4)]
  config = ml_collections.ConfigDict(dict(weight_decay=0.1, lr=0.01))
  tx, schedule = optim.build_optimizer(config, steps_per_epoch=2, num_epochs=2)
  state = tx.init(jnp.asarray(params))
  p = jnp.asarray(params)
  for g in grads:
    updates, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, updates)
  lrs = [float(schedule(s)) for s in range(4)]
  want = torch_adam_oracle(params, grads, lrs, 0.9, 0.99, 1e-8, 0.1)
  np.testing.assert_allclose(p, want, rtol=1e-5, atol=1e-6)


def test_cosine_schedule_is_torch_cosine_annealing_per_epoch():
  config = optim.default_optimizer_config()
  tx, schedule = optim.build_optimizer(config, steps_per_epoch=3, num_epochs=10,
                                       num_devices=4, global_batch=1024)
  base, end = 4e-3, 4e-8
  for step in range(30):
    epoch = step // 3
    want = end + (base - end) * (1 + math.cos(math.pi * epoch / 10)) / 2
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6)


def test_finetune_schedule_decays_per_epoch_and_warmup():
  config = optim.finetune_optimizer_config()
  config.warmup_epochs = 1
  _, schedule = optim.build_optimizer(config, steps_per_epoch=4, num_epochs=5,
                                      num_devices=8, global_batch=16)
  np.testing.assert_allclose([schedule(s) for s in range(4)],
                             [0, 2.5e-5, 5e-5, 7.5e-5], rtol=1e-6)
  np.testing.assert_allclose([schedule(s) for s in (4, 7, 8, 12)],
                             [1e-4, 1e-4, 0.98e-4, 0.98 ** 2 * 1e-4], rtol=1e-6)


def _config_file(name: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


@pytest.mark.parametrize("devices, global_batch, want", [
    (1, 256, 1e-3),     # the reference on one GPU
    (8, 2048, 8e-3),    # the reference on 8 GPUs: 1e-3 × GPUs at 256 per GPU
    (8, 256, 1e-3),     # the same global batch on more devices: the same lr
    (1, 96, 3.75e-4),   # not a multiple of 256: 1e-3 × 96 / 256
])
def test_pretraining_lr_is_1e_3_per_256_examples(devices, global_batch, want):
  config = _config_file("pretrain", "glcnet").optimizer
  _, schedule = optim.build_optimizer(config, steps_per_epoch=10, num_epochs=400,
                                      num_devices=devices, global_batch=global_batch)
  np.testing.assert_allclose(schedule(0), want, rtol=1e-6)


@pytest.mark.parametrize("devices, global_batch, want", [(1, 16, 1e-4), (8, 16, 1e-4),
                                                         (8, 64, 4e-4)])
def test_finetuning_lr_is_1e_4_per_16_examples(devices, global_batch, want):
  config = _config_file("finetune").optimizer
  _, schedule = optim.build_optimizer(config, steps_per_epoch=10, num_epochs=150,
                                      num_devices=devices, global_batch=global_batch)
  np.testing.assert_allclose(schedule(0), want, rtol=1e-6)


def test_batch_scaling_and_clipping():
  config = ml_collections.ConfigDict(dict(lr_scaling="batch", schedule="constant",
                                          grad_clip_norm=1.0, weight_decay=0.0))
  tx, schedule = optim.build_optimizer(config, steps_per_epoch=1, num_epochs=1,
                                       global_batch=512)
  np.testing.assert_allclose(schedule(0), 2e-3, rtol=1e-6)
  # After clipping a huge gradient, Adam's first step is lr · sign(g).
  p = jnp.zeros(3)
  updates, _ = tx.update(jnp.array([1e6, -2e6, 0.0]), tx.init(p), p)
  np.testing.assert_allclose(updates, [-2e-3, 2e-3, 0.0], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["adamw", "lars"])
def test_other_optimisers_build_and_step(name):
  config = ml_collections.ConfigDict(dict(name=name, schedule="constant"))
  tx, _ = optim.build_optimizer(config, steps_per_epoch=1, num_epochs=1)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
  updates, _ = tx.update(params, tx.init(params), params)
  assert all(np.all(np.asarray(u) < 0) for u in jax.tree.leaves(updates))


def test_bad_config_is_a_clear_error():
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.build_optimizer(ml_collections.ConfigDict(dict(name="sgdd")),
                          steps_per_epoch=1, num_epochs=1)
  with pytest.raises(ValueError, match="unknown keys"):
    optim.build_optimizer(ml_collections.ConfigDict(dict(learning_rate=1.0)),
                          steps_per_epoch=1, num_epochs=1)
