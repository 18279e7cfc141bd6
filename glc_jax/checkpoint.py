"""Checkpoints: the train state together with the data iterator, for exact resume.

Layout under a run's workdir:
  checkpoints/<step>/{state,data}  latest `keep` checkpoints (state pytree + Grain
                                   iterator state, one JSON per process)
  best/<step>/state                the state with the best validation metric
                                   (fine-tuning's model selection), kept alone

Orbax writes each step to a temporary directory and renames it when complete,
so a process killed mid-save leaves no checkpoint a restore would pick up.
"""
from __future__ import annotations

import pathlib
from typing import Any

import grain
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

PyTree = Any


class RunCheckpoints:
  """Saves and restores (state, data iterator) pairs under `workdir/checkpoints`.

  Args:
    workdir: the run's directory.
    every_steps: periodic save interval; `save(..., force=True)` saves regardless
      (the final step, or just before stopping on an error).
    keep: how many recent checkpoints to keep.
    best_metric: name of a validation metric to keep the best state by (higher
      is better), or None for no best-model tracking.
  """

  def __init__(self, workdir: str | pathlib.Path, every_steps: int, keep: int = 2,
               best_metric: str | None = None):
    root = pathlib.Path(workdir).absolute()
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
          root / "best",
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode="max",
              keep_checkpoints_without_metrics=False, cleanup_tmp_directories=True),
          item_names=("state",))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, state_template: PyTree, data_iterator) -> tuple[PyTree, int] | None:
    """Restores the latest checkpoint into the template's shapes and shardings.

    The data iterator is restored in place. Returns (state, step), or None when
    there is no checkpoint yet.
    """
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_template),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored["state"], step

  def save(self, step: int, state: PyTree, data_iterator, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def save_if_best(self, step: int, state: PyTree, metrics: dict[str, float]) -> bool:
    """Offers a validated state to the best-model slot; returns whether it is now the best."""
    if self._best is None:
      raise ValueError("RunCheckpoints was created without best_metric")
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


def read_state(path: str | pathlib.Path) -> PyTree:
  """Reads a saved state pytree as host arrays, without a template.

  `path` is a run's workdir (its best state if there is one, else the latest
  checkpoint) or one step directory.
  """
  path = pathlib.Path(path).absolute()
  for sub in ("best", "checkpoints"):
    if (path / sub).is_dir():
      # A read-only manager warns three times that it is read-only; that is the point here.
      verbosity = logging.get_verbosity()
      logging.set_verbosity(logging.ERROR)
      try:
        manager = ocp.CheckpointManager(path / sub, item_names=("state",),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
        step = manager.latest_step()
        manager.close()
      finally:
        logging.set_verbosity(verbosity)
      if step is not None:
        return read_state(path / sub / str(step))
  if not (path / "state").is_dir():
    raise FileNotFoundError(f"{path}: no checkpoint found (expected a run workdir or a step directory)")
  return ocp.StandardCheckpointer().restore(path / "state")


def load_variables(path: str | pathlib.Path) -> dict[str, PyTree]:
  """{'params', 'batch_stats'} of a model to start from, as host arrays.

  `path` is a pretraining or fine-tuning run's workdir (its best state if it
  has one, else the latest), one step directory, or a checkpoint written by
  `python -m glc_jax.tools.import_torch` (reference or torchvision weights).
  """
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"{path}: does not exist")
  if any((path / sub).is_dir() for sub in ("best", "checkpoints", "state")):
    tree = read_state(path)
  else:
    try:
      tree = ocp.StandardCheckpointer().restore(path)
    except Exception as e:  # orbax raises several types for "not a checkpoint"
      raise FileNotFoundError(f"{path}: not a checkpoint ({type(e).__name__})") from None
  if not isinstance(tree, dict) or "params" not in tree:
    raise FileNotFoundError(f"{path}: checkpoint holds no 'params'")
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
