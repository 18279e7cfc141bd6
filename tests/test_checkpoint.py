"""Checkpoints restore the state and the data iterator exactly."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glc_jax import checkpoint


def _iterator(seed=0):
  return iter(grain.MapDataset.range(50).shuffle(seed=seed).map(lambda i: i * 10).to_iter_dataset())


def _state(x):
  return {"params": {"w": jnp.full((3, 2), x, jnp.float32)}, "step": jnp.asarray(int(x), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(int(x)))}


def test_resume_restores_state_and_data_position(tmp_path):
  ckpt = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2)
  assert ckpt.restore(_state(0.0), _iterator()) is None
  it = _iterator()
  for step in range(1, 6):
    next(it)
    ckpt.save(step, _state(float(step)), it)
  ckpt.close()

  reopened = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2)
  fresh = _iterator()
  state, step = reopened.restore(_state(0.0), fresh)
  assert step == 4
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 4.0))
  reference = _iterator()
  for _ in range(4):
    next(reference)
  assert next(fresh) == next(reference)  # 5 is off the interval: resume replays from step 4
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
  reopened.close()


def test_best_keeps_highest_metric_and_read_state_finds_it(tmp_path):
  ckpt = checkpoint.RunCheckpoints(tmp_path, every_steps=100, best_metric="miou")
  assert ckpt.save_if_best(1, _state(1.0), {"miou": 0.3})
  assert ckpt.save_if_best(2, _state(2.0), {"miou": 0.5})
  assert not ckpt.save_if_best(3, _state(3.0), {"miou": 0.4})
  state, step = ckpt.restore_best(_state(0.0))
  assert step == 2 and float(state["params"]["w"][0, 0]) == 2.0
  ckpt.close()
  np.testing.assert_array_equal(checkpoint.read_state(tmp_path)["params"]["w"], np.full((3, 2), 2.0))


def test_read_state_names_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    checkpoint.read_state(tmp_path)
