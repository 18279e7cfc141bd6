"""The training loop shared by pretraining and fine-tuning.

Resumes from the workdir's newest checkpoint that restores (state and data
iterator; glc_jax/checkpoint.py says what happens to one that does not), logs,
checkpoints on an interval and at the end, validates at epoch ends, and stops
on a non-finite loss without saving the bad state.

Early stopping (fine-tuning, `patience` > 0): the run ends after `patience`
validations in a row that do not give a new best state, with a checkpoint of
the step it stopped at. The count is not kept in memory: validation runs
every `validate_every` steps, so it is the number of multiples of
`validate_every` after the step of the best state, which best/ records. A run
resumed after a kill therefore stops where the uninterrupted one did, and a
rerun of a run that stopped does not train on.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from glc_jax.checkpoint import BEST_LOSS_DIR, CheckpointError, RunCheckpoints
from glc_jax.run_log import RunLog


class NonFiniteLossError(RuntimeError):
  pass


def fit(state: Any, train_step: Callable, iterator, rng: jax.Array, *, workdir: str,
        total_steps: int, steps_per_epoch: int, checkpoint_every: int, keep_checkpoints: int,
        log_every: int, items_per_step: int, desc: str,
        validate: Callable[[Any], dict[str, float]] | None = None,
        best_metric: str | None = None,
        keep_best_loss: bool = False, probe=None, patience: int = 0,
        validate_every: int | None = None) -> tuple[Any, RunCheckpoints]:
  """Runs `train_step` up to `total_steps`, resuming from `workdir` if it can.

  Args:
    state: a freshly initialised train state: the template a checkpoint is
      restored into, and the starting point otherwise.
    train_step: (state, batch, rng) -> (state, metrics), state donated.
    iterator: the checkpointable Grain iterator of device batches.
    rng: the run's key; the step folds in the step number and device index.
    validate: state -> {name: value}, run every `validate_every` steps (default:
      each epoch end) and at the last step; with `best_metric`, the state with the
      best value of that metric is kept.
    keep_best_loss: log each epoch's mean loss ('epoch_loss') and keep the state
      of the epoch with the lowest in best_loss/ (the reference's choice of
      pretraining checkpoint; not with `best_metric`). An epoch that a resume
      cut into is logged and offered only if the run saw all of its steps.
    probe: a stages.probe.OnlineProbe, or None. It scores the initial state
      (step 0) of a fresh run and, where it is due, the state after a step,
      before that step's log record and checkpoint; its history is saved with
      every checkpoint and restored with the state.
    patience: with `best_metric`, stop after this many validations without a
      new best (a tie with the best counts as one, as it replaces the best
      state); 0 trains to `total_steps`. The step the run ended at is then its
      checkpoints' latest_step().
  Returns:
    (final state, the run's checkpoints, still open; the caller closes them).
  """
  if keep_best_loss and best_metric is not None:
    raise ValueError("fit: keep_best_loss and best_metric cannot be used together")
  if patience and (best_metric is None or validate is None):
    raise ValueError("fit: patience needs validate and best_metric")
  validate_every = validate_every or steps_per_epoch
  if keep_best_loss:
    checkpoints = RunCheckpoints(workdir, checkpoint_every, keep_checkpoints, "epoch_loss",
                                 best_mode="min", best_dir=BEST_LOSS_DIR)
  else:
    checkpoints = RunCheckpoints(workdir, checkpoint_every, keep_checkpoints, best_metric)
  start = 0
  try:
    restored = checkpoints.restore(state, iterator)
  except CheckpointError:
    checkpoints.close()
    iterator.close()
    raise
  if restored is not None:
    state, start = restored
    if probe is not None:
      probe.history = checkpoints.probe_history(start)
  log = RunLog(workdir, total_steps, start, items_per_step, desc)
  if start >= total_steps:
    log.message(f"{desc}: {workdir} has finished (step {start} of {total_steps}); nothing to train")
  elif start:
    log.message(f"{desc}: resumed from step {start} in {workdir}")

  def patience_spent(step: int) -> bool:
    best = checkpoints.best_step()
    # Validations after the best one, counted as multiples of validate_every: the best
    # may lie off them, at the last step of a run that was then rerun with more epochs.
    # A best state ahead of `step` was saved by the run this one resumes, which
    # therefore did not stop before it.
    return (bool(patience) and step % validate_every == 0 and best is not None
            and step // validate_every - best // validate_every >= patience)

  last_step = total_steps
  if start and patience_spent(start):
    log.message(f"{desc}: stopped early at step {start} (best {best_metric} at step "
                f"{checkpoints.best_step()}); not training further")
    last_step = start
  if last_step > start:
    # Worker start-up overlaps the probe and the first step's compilation.
    iterator.start_prefetch()
  # Summed on the device so that no step waits for the host.
  loss_sum, loss_steps = 0.0, 0
  try:
    if probe is not None and start == 0:
      # Step 0 probes the network before any update: the never-trained control.
      log.step(0, probe(state, 0))
    for step in range(start + 1, last_step + 1):
      state, metrics = train_step(state, next(iterator), rng)
      final = step == total_steps
      saving = final or step % checkpoint_every == 0
      epoch_end = step % steps_per_epoch == 0
      validating = validate is not None and (step % validate_every == 0 or final)
      if keep_best_loss:
        loss_sum, loss_steps = loss_sum + metrics["loss"], loss_steps + 1
      probing = probe is not None and probe.due(step, total_steps)
      if saving or epoch_end or validating or probing or step % log_every == 0:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(host["loss"]):
          last = checkpoints.latest_step()
          raise NonFiniteLossError(
              f"{desc}: loss is {host['loss']} at step {step}; stopped. The last good "
              f"checkpoint is step {last} in {workdir}" if last is not None else
              f"{desc}: loss is {host['loss']} at step {step}; stopped before any checkpoint")
        if probing:
          host.update(probe(state, step))
        if validating:
          scores = validate(state)
          host.update(scores)
          if best_metric is not None and checkpoints.save_if_best(step, state, scores):
            log.message(f"{desc}: step {step}: best {best_metric} so far, {scores[best_metric]:.4f}")
          if patience_spent(step):
            log.message(f"{desc}: step {step}: no better {best_metric} in {patience} validations "
                        f"since step {checkpoints.best_step()}; stopping early")
            final = True
        if keep_best_loss and epoch_end and loss_steps == steps_per_epoch:
          scores = {"epoch_loss": float(jax.device_get(loss_sum)) / loss_steps}
          host.update(scores)
          if checkpoints.save_if_best(step, state, scores):
            log.message(f"{desc}: step {step}: lowest epoch loss so far, "
                        f"{scores['epoch_loss']:.4f}")
        log.step(step, host)
      if epoch_end:
        loss_sum, loss_steps = 0.0, 0
      checkpoints.save(step, state, iterator, force=final,
                       probe_history=None if probe is None else probe.history)
      if final:
        break
  except BaseException:
    # Lets a save in flight finish, so the last good one stays whole.
    checkpoints.close(interrupted=True)
    raise
  finally:
    log.close()
    # Stops Grain's workers and frees their shared-memory buffers before exit.
    iterator.close()
  return state, checkpoints
