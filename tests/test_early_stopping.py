"""Early stopping of fine-tuning on the validation split, and where each run's best step fell.

The loop runs with a fake train step (the state is the step number) and a fake
validator that returns a scripted score per epoch end, so the step a run must
stop at is worked out by hand from the script, without compiling a model.
"""
import json
import math

import grain
import jax
import jax.numpy as jnp
import pytest

from glc_jax import checkpoint
from glc_jax.benchmark import matrix, report, runner
from glc_jax.stages import finetune, loop

STEPS_PER_EPOCH = 2
TOTAL = 30
# Validation score at each epoch end (step). Hand count with patience 3: best at
# 4; 6 and 8 do not beat it (2 in a row); 10 does (new best, count restarts); 12
# does not; 14 ties 10 and, as the later of equals, becomes the best state, so
# the count restarts; 16, 18, 20 do not: third validation without a new best ->
# stop at 20. With patience 4 the run goes on to 22 (0.63 < 0.65) and stops there.
SCORES = {2: 0.50, 4: 0.60, 6: 0.55, 8: 0.58, 10: 0.65, 12: 0.64, 14: 0.65, 16: 0.60,
          18: 0.61, 20: 0.62, 22: 0.63, 24: 0.64, 26: 0.64, 28: 0.60, 30: 0.61}


class Killed(Exception):
  """Stands in for a kill: the run ends in the middle, its checkpoints as they are."""


def _state(step):
  return {"params": {"w": jnp.full((2,), float(step))}, "step": jnp.asarray(step, jnp.int32)}


def _fit(workdir, patience, total=TOTAL, kill_at=None, checkpoint_every=4, validate_every=None):
  """Runs loop.fit; returns (steps trained, steps validated, best step, latest step)."""
  trained, validated = [], []

  def train_step(state, batch, rng):
    del batch, rng
    step = int(state["step"]) + 1
    if step == kill_at:
      raise Killed
    trained.append(step)
    return _state(step), {"loss": jnp.float32(1.0)}

  def validate(state):
    validated.append(int(state["step"]))
    return {"val_oa": SCORES[int(state["step"])]}

  iterator = grain.MapDataset.range(100).to_iter_dataset().__iter__()
  _, ckpts = loop.fit(_state(0), train_step, iterator, jax.random.key(0), workdir=str(workdir),
                      total_steps=total, steps_per_epoch=STEPS_PER_EPOCH,
                      checkpoint_every=checkpoint_every, keep_checkpoints=2, log_every=100,
                      items_per_step=1, desc="test", validate=validate, best_metric="val_oa",
                      patience=patience, validate_every=validate_every)
  best, latest = ckpts.best_step(), ckpts.latest_step()
  ckpts.close()
  return trained, validated, best, latest


def _logged_scores(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["val_oa"]) for r in records if "val_oa" in r]


@pytest.mark.parametrize("patience, stop, best", [(3, 20, 14), (4, 22, 14), (1, 6, 4)])
def test_stops_after_patience_validations_without_a_new_best(tmp_path, patience, stop, best):
  trained, validated, best_step, latest = _fit(tmp_path, patience)
  assert trained == list(range(1, stop + 1))
  assert validated == list(range(STEPS_PER_EPOCH, stop + 1, STEPS_PER_EPOCH))
  assert (best_step, latest) == (best, stop)
  # The state of the step it stopped at is saved, and evaluation reads the best one.
  assert checkpoint.read_state(tmp_path / "checkpoints" / str(stop))["params"]["w"][0] == stop
  assert checkpoint.load_variables(tmp_path)["params"]["w"][0] == best


def test_validating_every_two_epochs_counts_patience_in_those_validations(tmp_path):
  # Validations at 4, 8, ..., 28 and the last step, 30. Hand count with patience 2: best
  # at 4 (0.60); 8 (0.58) does not beat it; 12 (0.64) does; 16 and 20 do not -> stop at 20.
  trained, validated, best, latest = _fit(tmp_path, patience=2, validate_every=4)
  assert validated == [4, 8, 12, 16, 20] and trained == list(range(1, 21))
  assert (best, latest) == (12, 20)
  # Without patience the run also validates its last step, which is no multiple of 4.
  trained, validated, best, latest = _fit(tmp_path / "all", patience=0, validate_every=4)
  assert validated == [4, 8, 12, 16, 20, 24, 28, 30] and (best, latest) == (24, 30)


def test_patience_counts_validations_after_a_best_at_an_earlier_last_step(tmp_path):
  # A 14-step run validates at 4, 8, 12 and its last step, 14 (0.65, the best). Rerun to
  # 30 steps: 16 (0.60) and 20 (0.62) are two validations without a new best, so with
  # patience 2 it stops at 20, although 20 - 14 is less than two intervals of 4.
  _fit(tmp_path, patience=2, total=14, validate_every=4)
  trained, validated, best, latest = _fit(tmp_path, patience=2, validate_every=4)
  assert validated == [16, 20] and trained == list(range(15, 21))
  assert (best, latest) == (14, 20)


def test_patience_0_trains_every_step(tmp_path):
  trained, validated, best, latest = _fit(tmp_path, patience=0)
  assert trained == list(range(1, TOTAL + 1)) and len(validated) == TOTAL // STEPS_PER_EPOCH
  assert (best, latest) == (14, TOTAL)


@pytest.mark.parametrize("kill_at", [15, 19])
def test_killed_run_resumes_to_the_same_stop(tmp_path, kill_at):
  """Killed at 15 (last checkpoint 12, best/ already at 14: the resumed run replays
  steps whose best lies ahead) or at 19 (checkpoint 16, two validations without a new
  best already behind it): the resumed run stops at 20, as the uninterrupted one."""
  uninterrupted = tmp_path / "uninterrupted"
  _fit(uninterrupted, patience=3)
  work = tmp_path / "killed"
  with pytest.raises(Killed):
    _fit(work, patience=3, kill_at=kill_at)
  resumed_from = (kill_at - 1) // 4 * 4
  trained, _, best, latest = _fit(work, patience=3)
  assert trained == list(range(resumed_from + 1, 21))
  assert (best, latest) == (14, 20)
  assert _logged_scores(work) == _logged_scores(uninterrupted)


def test_rerun_of_a_stopped_run_does_not_train(tmp_path):
  _fit(tmp_path, patience=3)
  trained, validated, best, latest = _fit(tmp_path, patience=3)
  assert trained == [] and validated == [] and (best, latest) == (14, 20)
  # A larger patience (a key a resumed run may change) trains on, to where it alone stops.
  trained, _, best, latest = _fit(tmp_path, patience=4)
  assert trained == [21, 22] and (best, latest) == (14, 22)


def test_best_step_file_says_where_the_best_step_fell(tmp_path):
  _fit(tmp_path, patience=3)
  ckpts = checkpoint.RunCheckpoints(tmp_path, 4, 2, "val_oa")
  finetune.write_best_step(tmp_path, ckpts, planned_steps=TOTAL, steps_per_epoch=STEPS_PER_EPOCH,
                           validate_every_steps=STEPS_PER_EPOCH)
  ckpts.close()
  assert finetune.read_best_step(tmp_path) == {
      "select_metric": "val_oa", "best_step": 14, "best_value": 0.65, "stopped_step": 20,
      "planned_steps": TOTAL, "steps_per_epoch": STEPS_PER_EPOCH,
      "validate_every_steps": STEPS_PER_EPOCH}
  assert finetune.read_best_step(tmp_path / "elsewhere") is None


def test_patience_needs_a_best_metric(tmp_path):
  iterator = grain.MapDataset.range(10).to_iter_dataset().__iter__()
  with pytest.raises(ValueError, match="patience needs validate and best_metric"):
    loop.fit(_state(0), None, iterator, jax.random.key(0), workdir=str(tmp_path), total_steps=4,
             steps_per_epoch=2, checkpoint_every=2, keep_checkpoints=1, log_every=1,
             items_per_step=1, desc="test", patience=2)


def test_benchmark_rows_and_report_say_where_the_best_step_fell(tmp_path):
  """The runner puts each fine-tuning run's best_step.json into its results row, and
  results.md summarises them per init and fraction (figures worked out by hand)."""
  config = matrix.load_config("benchmark", "small")
  config.methods = ("glcnet",)
  # (init, fraction, seed) -> (best, stopped, planned); random/f0.25/seed1 has no record
  # (a run finished before runs wrote one) and glcnet/f0.25/seed1 is not done.
  fits = {("glcnet", 0.05, 0): (30, 90, 150), ("glcnet", 0.05, 1): (150, 150, 150),
          ("glcnet", 0.25, 0): (60, 105, 150), ("random", 0.05, 0): (45, 150, 150),
          ("random", 0.05, 1): (120, 150, 150), ("random", 0.25, 0): (150, 150, 150),
          ("random", 0.25, 1): None}
  for (init, fraction, seed), fit in fits.items():
    cell = matrix.Cell(init, fraction, seed)
    matrix.eval_dir(tmp_path, cell).mkdir(parents=True)
    (matrix.eval_dir(tmp_path, cell) / "metrics.json").write_text(json.dumps(
        {"overall_accuracy": 0.5, "kappa": 0.2, "miou": 0.3, "mean_f1": 0.4, "num_pixels": 9}))
    matrix.finetune_dir(tmp_path, cell).mkdir(parents=True)
    if fit is not None:
      (matrix.finetune_dir(tmp_path, cell) / finetune.BEST_STEP_FILE).write_text(json.dumps(
          {"select_metric": "val_oa", "best_step": fit[0], "best_value": 0.5,
           "stopped_step": fit[1], "planned_steps": fit[2], "steps_per_epoch": 3}))
  runner.write_reports(config, tmp_path, plots=False)

  rows = {(r["init"], r["fraction"], r["seed"]): r for r in report.read_csv(tmp_path / "results.csv")}
  assert rows.keys() == fits.keys()
  for key, fit in fits.items():
    got = tuple(rows[key][k] for k in ("best_step", "stopped_step", "planned_steps"))
    if fit is None:
      assert all(math.isnan(v) for v in got)
    else:
      assert got == fit
  text = (tmp_path / "results.md").read_text()
  section = text[text.index("## Where the best validation step fell"):]
  # glcnet 5%: best 30 and 150 (mean 90), ran 90 and 150 (mean 120): 33% and 100% (mean 67).
  assert "| glcnet | 5% | 2 | 90 | 120 of 150 | 67% (33–100%) | 1 | 1 |" in section
  assert "| glcnet | 25% | 1 | 60 | 105 of 150 | 57% (57–57%) | 1 | 0 |" in section
  # random 5%: best mean 82.5 (printed half to even), 45/150 = 30%, 120/150 = 80%.
  assert "| random | 5% | 2 | 82 | 150 of 150 | 55% (30–80%) | 0 | 0 |" in section
  assert "| random | 25% | 1 | 150 | 150 of 150 | 100% (100–100%) | 0 | 1 |" in section
  assert section.endswith("Best at the last validation: glcnet/f0.05/seed1, random/f0.25/seed0.\n")


def test_benchmark_patience_in_steps_becomes_validations_of_each_subset(tmp_path):
  config = matrix.load_config("benchmark", "small")
  config.finetune_steps = 600
  config.finetune_patience_steps = 100
  # Batch 8: 24 labelled tiles are 3 steps an epoch, 120 are 15.
  for num_labelled, epochs, patience in ((24, 200, 34), (120, 40, 7)):
    c = matrix.finetune_config(config, matrix.Cell("random", 0.05, 0), tmp_path, "/d", num_labelled)
    assert (c.epochs, c.early_stopping.patience) == (epochs, patience)
  config.finetune_patience_steps = 0  # the stage config's patience stands
  config.finetune.early_stopping = {"patience": 5}
  c = matrix.finetune_config(config, matrix.Cell("random", 0.05, 0), tmp_path, "/d", 24)
  assert c.early_stopping.patience == 5
  config.finetune_patience_steps = -1
  with pytest.raises(matrix.BenchmarkConfigError, match="^config key finetune_patience_steps is -1; "):
    matrix.check(config)


def test_benchmark_validation_interval_in_steps_becomes_epochs_of_each_subset(tmp_path):
  config = matrix.load_config("benchmark", "small")
  config.finetune_steps = 600
  config.finetune_validate_steps = 15
  config.finetune_patience_steps = 90
  # 24 labelled tiles: 3 steps an epoch, validated every 5 epochs (15 steps), patience
  # 90 / 15 = 6 validations; 120 tiles: 15 steps an epoch, every epoch, also 6.
  for num_labelled, every, patience in ((24, 5, 6), (120, 1, 6)):
    c = matrix.finetune_config(config, matrix.Cell("random", 0.05, 0), tmp_path, "/d", num_labelled)
    assert (c.validate_every_epochs, c.early_stopping.patience) == (every, patience)
  config.finetune_validate_steps = -1
  with pytest.raises(matrix.BenchmarkConfigError, match="^config key finetune_validate_steps is -1; "):
    matrix.check(config)


def test_a_finished_run_run_again_says_so_and_trains_nothing(tmp_path, capsys):
  trained = []

  def train_step(state, batch, rng):
    del batch, rng
    trained.append(int(state["step"]) + 1)
    return _state(trained[-1]), {"loss": jnp.float32(1.0)}

  for _ in range(2):
    iterator = grain.MapDataset.range(100).to_iter_dataset().__iter__()
    _, ckpts = loop.fit(_state(0), train_step, iterator, jax.random.key(0), workdir=str(tmp_path),
                        total_steps=4, steps_per_epoch=2, checkpoint_every=2, keep_checkpoints=1,
                        log_every=100, items_per_step=1, desc="test")
    ckpts.close()
  assert trained == [1, 2, 3, 4]
  assert f"test: {tmp_path} has finished (step 4 of 4); nothing to train" in capsys.readouterr().out
