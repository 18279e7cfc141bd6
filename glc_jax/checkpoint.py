"""Checkpoints: the train state together with the data iterator, for exact resume.

Layout under a run's workdir:
  checkpoints/<step>/{state,data}  latest `keep` checkpoints (state pytree + Grain
                                   iterator state, one JSON per process)
  best/<step>/state                the state with the best validation metric
                                   (fine-tuning's model selection), kept alone
  best_loss/<step>/state           pretraining's epoch with the lowest mean loss
                                   (the reference's "self_bestloss"), kept alone,
                                   when the run asks for it
  damaged_checkpoints/<step>       checkpoints set aside because they did not
                                   restore (see below); never deleted by a run

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves no checkpoint a restore would pick up.

Resume takes the newest checkpoint that restores. One that fails (a truncated
or damaged file) while an older one restores is moved to
damaged_checkpoints/<step> (<step>.1, ... if that name is taken) and one line
on stderr names it, the error and the step resumed from. Moving it out of
checkpoints/ matters: Orbax's LatestN policy would count it as the newest step
and delete intact ones, and the resumed run could not save that step again.
If no checkpoint restores, nothing is moved and CheckpointError names the
workdir (a config that no longer matches the checkpoints fails this way too).

A resumed run replays the steps after its checkpoint, and the interrupted run
may already have offered some of their epoch ends to best/. The replay is
exact, so such a step is kept as it is rather than saved again, and Orbax's
selection (the highest metric, the later step on ties) ends where an
uninterrupted run's does.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

PyTree = Any

DAMAGED_DIR = "damaged_checkpoints"
BEST_LOSS_DIR = "best_loss"


class CheckpointError(RuntimeError):
  """No checkpoint of the run restores; the message names the workdir."""


class RunCheckpoints:
  """Saves and restores (state, data iterator) pairs under `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    every_steps: periodic save interval; `save(..., force=True)` saves regardless
      (the final step, or just before stopping on an error).
    keep: how many recent checkpoints to keep.
    best_metric: name of a validation metric to keep the best state by (higher
      is better), or None for no best-model tracking.
    best_mode: "max" (higher is better) or "min".
    best_dir: the best state's folder under workdir: "best", or BEST_LOSS_DIR
      for pretraining's lowest-loss epoch.
  """

  def __init__(self, workdir: str | pathlib.Path, every_steps: int, keep: int = 2,
               best_metric: str | None = None, best_mode: str = "max",
               best_dir: str = "best"):
    root = pathlib.Path(workdir).absolute()
    self._root = root
    self._manager = ocp.CheckpointManager(
        root / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every_steps,
            preservation_policy=checkpoint_managers.LatestN(n=keep),
            cleanup_tmp_directories=True),
        item_names=("state", "data"))
    self.best_metric = best_metric
    self._best = None
    if best_metric is not None:
      self._best = ocp.CheckpointManager(
          root / best_dir,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode=best_mode,
              keep_checkpoints_without_metrics=False, cleanup_tmp_directories=True),
          item_names=("state",))
      # A run killed between saving a step and deleting the one it displaced
      # leaves both; keep the one Orbax would have kept.
      best = self._best.best_step()
      for step in self._best.all_steps():
        if best is not None and step != best:
          self._best.delete(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, state_template: PyTree, data_iterator) -> tuple[PyTree, int] | None:
    """Restores the newest checkpoint that restores, into the template's shapes and shardings.

    The data iterator is restored in place. Newer checkpoints that fail are
    set aside (see the module docstring). Returns (state, step), or None when
    there is no checkpoint yet; raises CheckpointError when none restores.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      # Damage surfaces as TensorStore, JSON or Orbax errors of many types.
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_template),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, _one_line(e)))
        continue
      if failed:
        self._set_aside(failed, step)
      return restored["state"], step
    if failed:
      step, reason = failed[0]
      raise CheckpointError(f"{self._root}: no checkpoint restores (the newest, step {step}: "
                            f"{reason})")
    return None

  def _set_aside(self, failed: list[tuple[int, str]], resumed: int) -> None:
    if jax.process_index() == 0:
      for step, reason in failed:
        target = self._root / DAMAGED_DIR / str(step)
        n = 0
        while target.exists():
          n += 1
          target = self._root / DAMAGED_DIR / f"{step}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self._root / "checkpoints" / str(step), target)
        print(f"checkpoint step {step} in {self._root} does not restore ({reason}); moved to "
              f"{target}; resuming from step {resumed}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices("glc_jax.checkpoint: damaged checkpoints set aside")
    self._manager.reload()

  def save(self, step: int, state: PyTree, data_iterator, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def save_if_best(self, step: int, state: PyTree, metrics: dict[str, float]) -> bool:
    """Offers a validated state to the best-model slot; returns whether it is now the best.

    A step already in the slot was saved by the run this one resumes, with the
    same state (see the module docstring): it is kept, not saved again.
    """
    if self._best is None:
      raise ValueError("RunCheckpoints was created without best_metric")
    if step not in self._best.all_steps():
      self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
                      metrics={k: float(v) for k, v in metrics.items()}, force=True)
      self._best.wait_until_finished()
    return self._best.best_step() == step

  def restore_best(self, state_template: PyTree) -> tuple[PyTree, int]:
    if self._best is None or self._best.best_step() is None:
      raise FileNotFoundError("no best checkpoint has been saved in this run")
    step = self._best.best_step()
    restored = self._best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_template)))
    return restored["state"], step

  def close(self):
    """Waits for pending saves and releases the managers."""
    self._manager.wait_until_finished()
    self._manager.close()
    if self._best is not None:
      self._best.close()


def _one_line(error: Exception, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def read_state(path: str | pathlib.Path) -> PyTree:
  """Reads a saved state pytree as host arrays, without a template.

  `path` is a run's workdir (its best state if there is one, else the latest
  checkpoint) or one step directory.
  """
  path = pathlib.Path(path).absolute()
  for sub in ("best", "checkpoints"):
    if (path / sub).is_dir():
      step = _latest_step(path / sub)
      if step is not None:
        return read_state(path / sub / str(step))
  if not (path / "state").is_dir():
    raise FileNotFoundError(f"{path}: no checkpoint found (expected a run workdir or a step directory)")
  return ocp.StandardCheckpointer().restore(path / "state")


def _latest_step(folder: pathlib.Path) -> int | None:
  # A read-only manager warns three times that it is read-only; that is the point here.
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    manager = ocp.CheckpointManager(folder, item_names=("state",),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    manager.close()
  finally:
    logging.set_verbosity(verbosity)
  return step


def _read_latest(folder: pathlib.Path) -> PyTree:
  step = _latest_step(folder)
  if step is None:
    raise FileNotFoundError(f"{folder}: holds no checkpoint")
  return read_state(folder / str(step))


def load_variables(path: str | pathlib.Path, which: str = "latest") -> dict[str, PyTree]:
  """{'params', 'batch_stats'} of a model to start from, as host arrays.

  `path` is a pretraining or fine-tuning run's workdir (its best state if it
  has one, else the latest), one step directory, or a checkpoint written by
  `python -m glc_jax.tools.import_torch` (reference or torchvision weights).
  which="best_loss" takes a pretraining workdir's lowest-loss epoch instead
  (best_loss/, kept when the run was asked to).
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"{path}: does not exist")
  if which not in ("latest", BEST_LOSS_DIR):
    raise ValueError(f"which = {which!r}; expected 'latest' or {BEST_LOSS_DIR!r}")
  if which == BEST_LOSS_DIR:
    if not (path / BEST_LOSS_DIR).is_dir():
      raise FileNotFoundError(f"{path}: has no {BEST_LOSS_DIR}/ (pretrain with "
                              "keep_best_loss=True to keep the lowest-loss epoch)")
    tree = _read_latest(path / BEST_LOSS_DIR)
  elif any((path / sub).is_dir() for sub in ("best", "checkpoints", "state")):
    tree = read_state(path)
  else:
    try:
      tree = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises several types for "not a checkpoint"
      raise FileNotFoundError(f"{path}: not a checkpoint ({type(e).__name__})") from None
  if not isinstance(tree, dict) or "params" not in tree:
    raise FileNotFoundError(f"{path}: checkpoint holds no 'params'")
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
