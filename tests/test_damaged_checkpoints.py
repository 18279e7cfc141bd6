"""Damaged checkpoints read as a starting point, for evaluation, or as the best state on resume.

The oracle is what was saved: each step's state holds the step number, so the
state that comes back says which checkpoint was read. The damage is what a
full disk or a bad copy leaves: a truncated file, a missing file or folder, a
save that never finished.
"""
import os
import shutil

import grain
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_prep import convert, synthetic
from glc_jax import checkpoint
from glc_jax.stages import evaluate, finetune, setup

from test_evaluate_outputs import _evaluate_config


def _iterator():
  return iter(grain.MapDataset.range(50).map(lambda i: i * 10).to_iter_dataset())


def _state(x):
  return {"params": {"w": jnp.full((3, 2), x, jnp.float32)},
          "batch_stats": {"mean": jnp.full((2,), x, jnp.float32)},
          "step": jnp.asarray(int(x), jnp.int32)}


def _saved_run(path, steps=4, best=None, best_dir="best", best_mode="max"):
  """checkpoints/{steps-2, steps}; with best={step: metric}, those offered at epoch ends."""
  ckpt = checkpoint.RunCheckpoints(path, every_steps=2, keep=2, best_metric=best and "m",
                                   best_mode=best_mode, best_dir=best_dir)
  it = _iterator()
  for step in range(1, steps + 1):
    next(it)
    ckpt.save(step, _state(float(step)), it)
    if best and step in best:
      ckpt.save_if_best(step, _state(float(step)), {"m": best[step]})
  ckpt.close()


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(path.stat().st_size // 2)


def _files(root):
  return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# What a full disk or a bad copy leaves in one step directory.
DAMAGE = {
    "truncated manifest": lambda step: _truncate(step / "state" / "manifest.ocdbt"),
    "truncated metadata": lambda step: _truncate(step / "state" / "_METADATA"),
    "no state folder": lambda step: shutil.rmtree(step / "state"),
}


def _ours(err):
  # A failed TensorStore read can also print Orbax-internal "Event loop is closed"
  # tracebacks on its own; the lines asserted on are this project's.
  return [line for line in err.splitlines() if "does not restore" in line]


@pytest.mark.parametrize("damage", DAMAGE)
def test_workdir_read_skips_damaged_newest_and_moves_nothing(tmp_path, capsys, damage):
  _saved_run(tmp_path)
  DAMAGE[damage](tmp_path / "checkpoints" / "4")
  before = _files(tmp_path)
  variables = checkpoint.load_variables(tmp_path)
  np.testing.assert_array_equal(variables["params"]["w"], np.full((3, 2), 2.0))
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.full((2,), 2.0))
  lines = _ours(capsys.readouterr().err)
  assert len(lines) == 1 and lines[0].startswith(f"checkpoint step 4 in {tmp_path} does not restore ("), lines
  assert lines[0].endswith("); reading step 2 instead")
  # Another run's workdir: read only.
  assert _files(tmp_path) == before
  assert not (tmp_path / checkpoint.DAMAGED_DIR).exists()


def test_workdir_where_nothing_restores_is_one_line(tmp_path):
  _saved_run(tmp_path)
  for step in (2, 4):
    DAMAGE["truncated metadata"](tmp_path / "checkpoints" / str(step))
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^{tmp_path}: no checkpoint restores \(the newest, step 4: JSONDecodeError: ")) as error:
    checkpoint.load_variables(tmp_path)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("damage", DAMAGE)
def test_named_step_that_does_not_restore_is_one_line(tmp_path, damage):
  _saved_run(tmp_path)
  step = tmp_path / "checkpoints" / "4"
  DAMAGE[damage](step)
  # The user chose this checkpoint: no other stands in for it.
  with pytest.raises(checkpoint.CheckpointError, match=rf"^{step}: does not restore \(.+\)$") as error:
    checkpoint.load_variables(step)
  assert "\n" not in str(error.value)


def test_unfinished_save_is_refused(tmp_path):
  _saved_run(tmp_path)
  # What a save killed before Orbax's final rename leaves (a whole copy: nothing
  # but the name tells it from a finished step).
  unfinished = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1764270000000000"
  shutil.copytree(tmp_path / "checkpoints" / "4", unfinished)
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^{unfinished}: does not restore \(an unfinished save: Orbax had not renamed it into "
      r"place\)$")):
    checkpoint.load_variables(unfinished)
  # Read as part of the workdir it is not a step at all.
  assert float(checkpoint.load_variables(tmp_path)["params"]["w"][0, 0]) == 4.0


def test_damaged_best_state_is_an_error_not_the_latest(tmp_path):
  _saved_run(tmp_path, best={2: 0.9, 4: 0.5})
  best = tmp_path / "best" / "2"
  DAMAGE["truncated manifest"](best)
  # checkpoints/4 restores, but it is not the state the run selected on validation.
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"^{best}: does not restore \(ValueError: .+\); no other checkpoint is the state the run "
      r"selected on validation \(name a step directory under checkpoints/ to read that one "
      r"instead\)$")):
    checkpoint.load_variables(tmp_path)


def test_damaged_best_loss_epoch_is_an_error(tmp_path):
  _saved_run(tmp_path, best={2: 0.1, 4: 0.3}, best_dir=checkpoint.BEST_LOSS_DIR, best_mode="min")
  chosen = tmp_path / checkpoint.BEST_LOSS_DIR / "2"
  DAMAGE["truncated metadata"](chosen)
  with pytest.raises(checkpoint.CheckpointError, match=rf"^{chosen}: does not restore \(JSONDecodeError: "):
    checkpoint.load_variables(tmp_path, checkpoint.BEST_LOSS_DIR)


def test_damaged_imported_checkpoint_is_not_called_not_a_checkpoint(tmp_path):
  from glc_jax.tools import import_torch
  out = tmp_path / "imported"
  import_torch.save_imported(str(out), {"params": {"w": np.ones((3, 2), np.float32)}, "batch_stats": {}})
  np.testing.assert_array_equal(checkpoint.load_variables(out)["params"]["w"], np.ones((3, 2)))
  _truncate(out / "manifest.ocdbt")
  with pytest.raises(checkpoint.CheckpointError, match=rf"^{out}: does not restore \(ValueError: "):
    checkpoint.load_variables(out)


def test_finetune_init_path_damaged_is_a_config_error(tmp_path):
  _saved_run(tmp_path)
  step = tmp_path / "checkpoints" / "4"
  DAMAGE["truncated metadata"](step)
  config = ml_collections.ConfigDict({"init": {"kind": "checkpoint", "path": str(step),
                                               "transfer": "backbone", "checkpoint": "latest"}})
  with pytest.raises(setup.ConfigError, match=rf"^init.path: {step}: does not restore \(JSONDecodeError: "):
    finetune.load_pretrained(config, num_bands=4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("damaged_eval")
  synthetic.write_corpus(root / "corpus", num_scenes=1, height=64, width=64, seed=4)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         progress=False)


def test_evaluating_a_workdir_with_a_damaged_best_writes_nothing(dataset, tmp_path):
  run = tmp_path / "finetune"
  _saved_run(run, best={4: 0.5})
  DAMAGE["no state folder"](run / "best" / "4")
  with pytest.raises(setup.ConfigError, match=(
      rf"^checkpoint: {run / 'best' / '4'}: does not restore \(it has no state/\); no other ")):
    evaluate.run(_evaluate_config(dataset, run), str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


# A resumed run and its best state: each damage, then the run goes on.
BEST_DAMAGE = {
    "truncated manifest": lambda step: _truncate(step / "state" / "manifest.ocdbt"),
    "truncated metadata": lambda step: _truncate(step / "state" / "_METADATA"),
    "no state folder": lambda step: shutil.rmtree(step / "state"),
    # Orbax's manager parses every step's metrics when it opens the folder.
    "truncated metrics": lambda step: _truncate(step / "metrics" / "metrics"),
    # Orbax cannot rank a step without metrics and would delete it unannounced.
    "no metrics": lambda step: shutil.rmtree(step / "metrics"),
}


@pytest.mark.parametrize("best_dir, mode, metrics", [("best", "max", {2: 0.9, 4: 0.5}),
                                                     (checkpoint.BEST_LOSS_DIR, "min", {2: 0.1, 4: 0.3})])
@pytest.mark.parametrize("damage", BEST_DAMAGE)
def test_resume_sets_a_damaged_best_aside_and_chooses_again(tmp_path, capsys, damage, best_dir, mode,
                                                            metrics):
  _saved_run(tmp_path, best=metrics, best_dir=best_dir, best_mode=mode)
  BEST_DAMAGE[damage](tmp_path / best_dir / "2")
  damaged = _files(tmp_path / best_dir / "2")
  capsys.readouterr()

  resumed = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2, best_metric="m",
                                      best_mode=mode, best_dir=best_dir)
  state, step = resumed.restore(_state(0.0), _iterator())
  assert step == 4 and float(state["params"]["w"][0, 0]) == 4.0
  lines = _ours(capsys.readouterr().err)
  target = tmp_path / checkpoint.DAMAGED_DIR / best_dir / "2"
  assert len(lines) == 1, lines
  assert lines[0].startswith(f"{best_dir} checkpoint step 2 in {tmp_path} does not restore (")
  assert lines[0].endswith(f"); moved to {target}; {best_dir}/ is chosen again from the epoch ends "
                           "still to come")
  assert _files(target) == damaged

  # The next epoch end is the best now, though it scores worse than the lost one.
  worse = {"max": 0.4, "min": 0.5}[mode]
  assert resumed.save_if_best(6, _state(6.0), {"m": worse})
  state, step = resumed.restore_best(_state(0.0))
  resumed.close()
  assert step == 6 and float(state["params"]["w"][0, 0]) == 6.0
  if best_dir == "best":
    np.testing.assert_array_equal(checkpoint.read_state(tmp_path)["params"]["w"], np.full((3, 2), 6.0))


def test_damaged_best_after_the_resume_step_is_saved_again_by_the_replay(tmp_path):
  # Killed after the epoch end at step 5 was saved as the best, before the next periodic save.
  _saved_run(tmp_path, steps=5, best={5: 0.9})
  DAMAGE["truncated manifest"](tmp_path / "best" / "5")
  resumed = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2, best_metric="m")
  assert resumed.restore(_state(0.0), _iterator())[1] == 4
  assert resumed.save_if_best(5, _state(5.0), {"m": 0.9})  # the replay's step 5, the same state
  resumed.close()
  np.testing.assert_array_equal(checkpoint.read_state(tmp_path)["params"]["w"], np.full((3, 2), 5.0))


def test_resume_keeps_a_best_state_that_restores(tmp_path, capsys):
  _saved_run(tmp_path, best={2: 0.9, 4: 0.5})
  before = _files(tmp_path / "best")
  capsys.readouterr()
  resumed = checkpoint.RunCheckpoints(tmp_path, every_steps=2, keep=2, best_metric="m")
  assert resumed.restore(_state(0.0), _iterator())[1] == 4
  assert not resumed.save_if_best(6, _state(6.0), {"m": 0.4})
  resumed.close()
  assert _ours(capsys.readouterr().err) == []
  assert _files(tmp_path / "best") == before
  assert not os.path.exists(tmp_path / checkpoint.DAMAGED_DIR)
