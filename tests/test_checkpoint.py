"""Checkpoints restore the state and the data iterator exactly."""
import multiprocessing
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glc_jax import checkpoint
from glc_jax.data import pipelines


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


def test_a_ctrl_c_while_closing_lets_the_last_save_finish(tmp_path):
  """The interrupted run's line names the newest checkpoint it finds: it must be there whole."""
  ckpt = checkpoint.RunCheckpoints(tmp_path, every_steps=1, keep=1)
  ckpt.save(1, _state(1.0), _iterator())
  ckpt.save(2, _state(2.0), _iterator())
  waits = []
  finish = ckpt._manager.wait_until_finished  # pylint: disable=protected-access

  def interrupted_once():
    waits.append(len(waits))
    if len(waits) == 1:
      raise KeyboardInterrupt
    finish()

  ckpt._manager.wait_until_finished = interrupted_once  # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    ckpt.close()
  assert waits == [0, 1]
  assert _steps(tmp_path / "checkpoints") == [2]
  np.testing.assert_array_equal(checkpoint.read_state(tmp_path)["params"]["w"], np.full((3, 2), 2.0))


def test_a_ctrl_c_while_an_interrupted_run_closes_stops_the_wait(tmp_path):
  """The run's first Ctrl-C came in the training loop; the next one must not be swallowed."""
  ckpt = checkpoint.RunCheckpoints(tmp_path, every_steps=1, keep=1)
  ckpt.save(1, _state(1.0), _iterator())
  waits = []
  finish = ckpt._manager.wait_until_finished  # pylint: disable=protected-access

  def interrupted():
    waits.append(len(waits))
    raise KeyboardInterrupt

  ckpt._manager.wait_until_finished = interrupted  # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    ckpt.close(interrupted=True)
  assert waits == [0]
  finish()


def _square(i):
  return np.full((2,), i * i)


def _data_workers(wait_s: float) -> list:
  """The Grain worker processes alive now, or started within `wait_s`."""
  deadline = time.monotonic() + wait_s
  while True:
    workers = [p for p in multiprocessing.active_children() if p.name.startswith("grain-")]
    if workers or time.monotonic() > deadline:
      return workers
    time.sleep(0.05)


@pytest.mark.slow
def test_restore_sets_the_data_position_without_starting_workers(tmp_path):
  # A rerun of a finished run restores and stops: workers started on restore were
  # stopped before they settled and Grain lost their shared-memory buffers.
  ds = grain.MapDataset.range(40).map(_square)
  ckpt = checkpoint.RunCheckpoints(tmp_path, every_steps=1, keep=1)
  it = pipelines.make_iterator(ds, num_workers=2)
  try:
    for step in range(1, 4):
      next(it)
      ckpt.save(step, _state(float(step)), it)
    expected = [next(it) for _ in range(3)]
  finally:
    it.close()
    ckpt.close()

  reopened = checkpoint.RunCheckpoints(tmp_path, every_steps=1, keep=1)
  fresh = pipelines.make_iterator(ds, num_workers=2)
  try:
    assert reopened.restore(_state(0.0), fresh)[1] == 3
    assert _data_workers(wait_s=2.0) == []
    np.testing.assert_array_equal([next(fresh) for _ in range(3)], expected)
  finally:
    fresh.close()
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


def _steps(root):
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _files(root):
  return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _saved_run(path, steps=4):
  ckpt = checkpoint.RunCheckpoints(path, every_steps=2, keep=2)
  it = _iterator()
  for step in range(1, steps + 1):
    next(it)
    ckpt.save(step, _state(float(step)), it)
  ckpt.close()


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def test_damaged_latest_checkpoint_falls_back_and_is_set_aside(tmp_path, capsys):
  _saved_run(tmp_path)
  _truncate(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt")
  damaged = _files(tmp_path / "checkpoints" / "4")

  reopened = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2)
  fresh = _iterator()
  state, step = reopened.restore(_state(0.0), fresh)
  assert step == 2
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 2.0))
  reference = _iterator()
  for _ in range(2):
    next(reference)
  assert next(fresh) == next(reference)

  message = capsys.readouterr().err.strip()
  assert len(message.splitlines()) == 1, message
  assert f"checkpoint step 4 in {tmp_path} does not restore (" in message
  assert message.endswith(f"moved to {tmp_path / 'damaged_checkpoints' / '4'}; resuming from step 2")
  # Set aside whole, not deleted; checkpoints/ no longer counts it.
  assert _files(tmp_path / "damaged_checkpoints" / "4") == damaged
  assert _steps(tmp_path / "checkpoints") == [2]

  # The resumed run saves step 4 again, and keeps its latest two.
  for step in (3, 4):
    next(fresh)
    reopened.save(step, _state(float(step)), fresh)
  reopened.close()
  assert _steps(tmp_path / "checkpoints") == [2, 4]
  again = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2)
  state, step = again.restore(_state(0.0), _iterator())
  again.close()
  assert step == 4 and float(state["params"]["w"][0, 0]) == 4.0


def test_no_checkpoint_restores_is_one_line_naming_the_workdir(tmp_path):
  _saved_run(tmp_path)
  for step in (2, 4):
    _truncate(tmp_path / "checkpoints" / str(step) / "data" / "process_0-of-1.json")
  before = _files(tmp_path / "checkpoints")
  reopened = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2)
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"^{tmp_path}: no checkpoint restores \(the newest, step 4: ") as error:
    reopened.restore(_state(0.0), _iterator())
  reopened.close()
  assert "\n" not in str(error.value)
  assert _files(tmp_path / "checkpoints") == before
  assert not (tmp_path / "damaged_checkpoints").exists()


# (step, val metric) offered at epoch ends: 6 ties 4 and is the later, so it is the best.
_EPOCH_ENDS = [(2, 0.5), (4, 0.7), (6, 0.7), (8, 0.6)]


@pytest.mark.parametrize("resumed_from", [1, 3, 5])
def test_resumed_run_replaying_epoch_ends_keeps_the_uninterrupted_best(tmp_path, resumed_from):
  uninterrupted = checkpoint.RunCheckpoints(tmp_path / "a", every_steps=100, best_metric="miou")
  for step, value in _EPOCH_ENDS:
    uninterrupted.save_if_best(step, _state(float(step)), {"miou": value})
  uninterrupted.close()
  assert _steps(tmp_path / "a" / "best") == [6]

  # Killed after offering 2, 4 and 6; resumed from a checkpoint before them, the
  # run offers the epoch ends after it again (the same states), then 8.
  killed = checkpoint.RunCheckpoints(tmp_path / "b", every_steps=100, best_metric="miou")
  for step, value in _EPOCH_ENDS[:3]:
    killed.save_if_best(step, _state(float(step)), {"miou": value})
  killed.close()
  resumed = checkpoint.RunCheckpoints(tmp_path / "b", every_steps=100, best_metric="miou")
  for step, value in _EPOCH_ENDS:
    if step > resumed_from:
      resumed.save_if_best(step, _state(float(step)), {"miou": value})
  state, step = resumed.restore_best(_state(0.0))
  resumed.close()
  assert step == 6 and float(state["params"]["w"][0, 0]) == 6.0
  assert _steps(tmp_path / "b" / "best") == [6]


def test_best_slot_left_with_two_steps_keeps_the_best(tmp_path):
  # A kill between saving step 4 and deleting the step it lost to (2) leaves both.
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(tmp_path / "best", item_names=("state",),
                                  options=ocp.CheckpointManagerOptions(best_fn=lambda m: m["miou"]))
  for step, value in [(2, 0.8), (4, 0.3)]:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(float(step)))),
                 metrics={"miou": value}, force=True)
  manager.close()
  assert _steps(tmp_path / "best") == [2, 4]

  checkpoint.RunCheckpoints(tmp_path, every_steps=100, best_metric="miou").close()
  assert _steps(tmp_path / "best") == [2]
  np.testing.assert_array_equal(checkpoint.read_state(tmp_path)["params"]["w"], np.full((3, 2), 2.0))
