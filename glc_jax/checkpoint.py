"""Checkpoints: the train state together with the data iterator, for exact resume.

Layout under a run's workdir:
  checkpoints/<step>/{state,data}  latest `keep` checkpoints (state pytree + Grain
                                   iterator state, one JSON per process)
  checkpoints/<step>/probe         the online probe's history of scores up to
                                   that step (JSON), when the run probes
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

A resume also restores the best state (best/ or best_loss/). One that fails is
moved to damaged_checkpoints/<best dir>/<step> with one line on stderr, and the
best is chosen again from the epoch ends the resumed run reaches: left in
place, it would stay "the best" on its metric alone and be what evaluation
reads.

Reading a workdir as a starting point or for evaluation (read_state) takes its
best state, else its newest checkpoint that restores, and moves nothing (the
workdir is another run's). A damaged best state, or a damaged step directory
named exactly, is a CheckpointError naming the path: nothing else stands in
for the checkpoint the user chose.

A resumed run replays the steps after its checkpoint, and the interrupted run
may already have offered some of their epoch ends to best/. The replay is
exact, so such a step is kept as it is rather than saved again, and Orbax's
selection (the highest metric, the later step on ties) ends where an
uninterrupted run's does.
"""
from __future__ import annotations

import json
import pathlib
import shutil
import sys
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers
from orbax.checkpoint.checkpoint_manager import METRIC_ITEM_NAME

PyTree = Any

DAMAGED_DIR = "damaged_checkpoints"
BEST_LOSS_DIR = "best_loss"


class CheckpointError(RuntimeError):
  """A checkpoint that was asked for does not restore; one line naming its path."""


class _Unrestorable(Exception):
  """One step directory does not restore; the argument says why, in one line."""


class _StateOnly:
  """A data iterator as Grain's Orbax handler sees it on restore: the state is set and
  the prefetch is not started.

  The handler starts the prefetch (the worker processes) right after setting the state.
  A rerun of a finished run then starts workers only to stop them, and Grain loses the
  shared-memory buffers of workers stopped that early (a resource_tracker warning at
  exit); loop.fit starts the prefetch when it has steps to run. The handler passes the
  state as bytes to an iterator that is not a DatasetIterator.
  """

  def __init__(self, iterator):
    self._iterator = iterator

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    pass


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
        item_names=("state", "data", "probe"))
    self.best_metric = best_metric
    self._best = None
    if best_metric is not None:
      # Orbax parses every step's metrics when it opens the folder, and fails on
      # one that does not parse.
      self._set_aside(None, best_dir, _unparsable_metrics(root / best_dir),
                      _BEST_CHOSEN_AGAIN.format(best_dir))
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

    The data iterator is restored in place, its prefetch not started. Newer
    checkpoints that fail are set aside, and so is a best state that does not restore
    (see the module docstring). Returns (state, step), or None when there is no
    checkpoint yet; raises CheckpointError when none restores.
    """
    failed = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      # Damage surfaces as TensorStore, JSON or Orbax errors of many types.
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state_template),
            data=grain.checkpoint.CheckpointRestore(_StateOnly(data_iterator))))
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, _one_line(e)))
        continue
      self._set_aside(self._manager, "checkpoints", failed, f"resuming from step {step}")
      self._check_best(state_template)
      return restored["state"], step
    if failed:
      step, reason = failed[0]
      raise CheckpointError(f"{self._root}: no checkpoint restores (the newest, step {step}: "
                            f"{reason})")
    self._check_best(state_template)
    return None

  def _check_best(self, state_template: PyTree) -> None:
    """Sets the best state aside if it does not restore (see the module docstring)."""
    if self._best is None:
      return
    best_dir = self._best.directory.name
    failed = []
    for step in self._best.all_steps():
      # Without its metrics Orbax cannot rank the step and would delete it unannounced.
      if self._best.metrics(step) is None:
        failed.append((step, "its metrics are missing"))
        continue
      try:
        _read_step(self._root / best_dir / str(step), state_template)
      except _Unrestorable as e:
        failed.append((step, str(e)))
    self._set_aside(self._best, best_dir, failed, _BEST_CHOSEN_AGAIN.format(best_dir))

  def _set_aside(self, manager: ocp.CheckpointManager | None, folder: str,
                 failed: list[tuple[int, str]], outcome: str) -> None:
    """Moves the failed steps of `folder` to damaged_checkpoints/, one line on stderr each.

    Called by every process whether or not it saw a failure: process 0 moves,
    and the others must meet it at the barrier even if they looked after the move.
    """
    if not failed and jax.process_count() == 1:
      return
    periodic = folder == "checkpoints"
    damaged = self._root / DAMAGED_DIR if periodic else self._root / DAMAGED_DIR / folder
    what = "checkpoint" if periodic else f"{folder} checkpoint"
    if jax.process_index() == 0:
      for step, reason in failed:
        target = damaged / str(step)
        n = 0
        while target.exists():
          n += 1
          target = damaged / f"{step}.{n}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self._root / folder / str(step), target)
        print(f"{what} step {step} in {self._root} does not restore ({reason}); moved to "
              f"{target}; {outcome}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"glc_jax.checkpoint: damaged {folder} set aside")
    if manager is not None:
      manager.reload()

  def save(self, step: int, state: PyTree, data_iterator, force: bool = False,
           probe_history: list[dict] | None = None) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved.

    probe_history: the online probe's scores so far (JSON-able), saved with the state.
    """
    items = dict(state=ocp.args.StandardSave(state),
                 data=grain.checkpoint.CheckpointSave(data_iterator))
    if probe_history is not None:
      items["probe"] = ocp.args.JsonSave({"history": probe_history})
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def probe_history(self, step: int) -> list[dict]:
    """The probe history saved with checkpoint `step` ([] when it has none)."""
    if not (self._root / "checkpoints" / str(step) / "probe").is_dir():
      return []
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(probe=ocp.args.JsonRestore()))
      return list(restored["probe"]["history"])
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"{self._root / 'checkpoints' / str(step) / 'probe'}: does not "
                            f"restore ({_one_line(e)})") from None

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

  def best_step(self) -> int | None:
    """The step of the best state so far (None without one, or without best_metric)."""
    return None if self._best is None else self._best.best_step()

  def best_metrics(self) -> dict[str, float] | None:
    """The validation scores saved with the best state (None without one)."""
    step = self.best_step()
    return None if step is None else dict(self._best.metrics(step))

  def restore_best(self, state_template: PyTree) -> tuple[PyTree, int]:
    if self._best is None or self._best.best_step() is None:
      raise FileNotFoundError("no best checkpoint has been saved in this run")
    step = self._best.best_step()
    restored = self._best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_template)))
    return restored["state"], step

  def close(self, interrupted: bool = False):
    """Waits for pending saves and releases the managers.

    A save cut short would leave the workdir unlike what an interrupted run's line says (its
    newest step still being renamed into place, the step it displaced half deleted), so the
    first Ctrl-C waits on and is raised after the wait; the next one stops the wait.
    `interrupted`: the run is already stopping (a Ctrl-C or an error), so a Ctrl-C now is the
    next one.
    """
    try:
      self._manager.wait_until_finished()
    except KeyboardInterrupt:
      if interrupted:
        raise
      self._manager.wait_until_finished()
      raise
    self._manager.close()
    if self._best is not None:
      self._best.close()


_BEST_CHOSEN_AGAIN = "{}/ is chosen again from the epoch ends still to come"


def _unparsable_metrics(folder: pathlib.Path) -> list[tuple[int, str]]:
  """(step, why) for each step under `folder` whose saved metrics do not parse."""
  failed = []
  for step in saved_steps(folder):
    path = folder / str(step) / METRIC_ITEM_NAME / METRIC_ITEM_NAME
    try:
      json.loads(path.read_text())
    except FileNotFoundError:
      continue  # no metrics at all: _check_best reports it once a template is at hand
    except (OSError, ValueError) as e:
      failed.append((step, f"its metrics do not parse: {_one_line(e)}"))
  return failed


def _one_line(error: Exception, limit: int = 300) -> str:
  text = " ".join(str(error).split())
  text = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + "..."


def read_state(path: str | pathlib.Path) -> PyTree:
  """Reads a saved state pytree as host arrays, without a template.

  `path` is a run's workdir or one step directory. Of a workdir it reads the
  best state if there is one, else the newest checkpoint that restores; one
  line on stderr names each newer one skipped, and nothing is moved (see the
  module docstring). Raises FileNotFoundError when `path` holds no checkpoint
  and CheckpointError, naming the path, when the one to read does not restore.
  """
  path = pathlib.Path(path).absolute()
  best = saved_steps(path / "best")
  if best:
    step_dir = path / "best" / str(best[-1])
    try:
      return _read_step(step_dir)
    except _Unrestorable as e:
      raise CheckpointError(f"{step_dir}: does not restore ({e}); no other checkpoint is the state "
                            "the run selected on validation (name a step directory under "
                            "checkpoints/ to read that one instead)") from None
  steps = saved_steps(path / "checkpoints")
  if steps:
    return _read_newest(path, steps)
  if _is_step_dir(path):
    return _read_named(path)
  raise FileNotFoundError(f"{path}: no checkpoint found (expected a run workdir or a step directory)")


def saved_steps(folder: pathlib.Path) -> list[int]:
  """The finished steps under `folder`, oldest first ([] when there is no folder).

  Listed from the folder names: an Orbax manager would also parse each step's
  metrics and fail on a damaged one, which reading the state does not need.
  """
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def _is_pytree_dir(path: pathlib.Path) -> bool:
  """An Orbax pytree checkpoint itself (a step's state/, or what import_torch writes)."""
  return (path / "_METADATA").is_file() or (path / "manifest.ocdbt").is_file()


def _is_step_dir(path: pathlib.Path) -> bool:
  """A step directory, whole, damaged or unfinished (it may have lost its state/)."""
  return not _is_pytree_dir(path) and (
      (path / "state").is_dir() or (path / "_CHECKPOINT_METADATA").is_file()
      or not ocp.path.step.is_checkpoint_finalized(path))


def _read_step(step_dir: pathlib.Path, template: PyTree | None = None) -> PyTree:
  """The state of one step directory; raises _Unrestorable."""
  _check_finalized(step_dir)
  if not (step_dir / "state").is_dir():
    raise _Unrestorable("it has no state/")
  return _read_pytree(step_dir / "state", template)


def _read_pytree(folder: pathlib.Path, template: PyTree | None = None) -> PyTree:
  """An Orbax pytree checkpoint folder, into `template` or else as host arrays.

  Raises _Unrestorable.
  """
  _check_finalized(folder)
  try:
    # Closed on the way out: a checkpointer (or manager) left open after a failed
    # read has its TensorStore callbacks hit a closed event loop and print tracebacks.
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(folder, template)
  except Exception as e:  # Damage surfaces as TensorStore, JSON or Orbax errors of many types.
    raise _Unrestorable(_one_line(e)) from None


def _check_finalized(folder: pathlib.Path) -> None:
  # Orbax writes under a temporary name and renames the folder once the save is complete.
  if not ocp.path.step.is_checkpoint_finalized(folder):
    raise _Unrestorable("an unfinished save: Orbax had not renamed it into place")


def _read_named(step_dir: pathlib.Path) -> PyTree:
  try:
    return _read_step(step_dir)
  except _Unrestorable as e:
    raise CheckpointError(f"{step_dir}: does not restore ({e})") from None


def _read_newest(workdir: pathlib.Path, steps: list[int]) -> PyTree:
  failed = []
  for step in reversed(steps):
    try:
      tree = _read_step(workdir / "checkpoints" / str(step))
    except _Unrestorable as e:
      failed.append((step, str(e)))
      continue
    if jax.process_index() == 0:
      for skipped, reason in failed:
        print(f"checkpoint step {skipped} in {workdir} does not restore ({reason}); reading "
              f"step {step} instead", file=sys.stderr, flush=True)
    return tree
  step, reason = failed[0]
  raise CheckpointError(f"{workdir}: no checkpoint restores (the newest, step {step}: {reason})")


def run_workdir(path: str | pathlib.Path) -> pathlib.Path:
  """The run workdir a checkpoint path belongs to: the workdir itself, or for one step
  directory (`<workdir>/{checkpoints,best,best_loss}/<step>`) the workdir above it; where
  the run's config.json is."""
  path = pathlib.Path(path).absolute()
  if (path.name.isdigit() and path.parent.name in ("checkpoints", "best", BEST_LOSS_DIR)
      and _is_step_dir(path)):
    return path.parent.parent
  return path


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
    steps = saved_steps(path / BEST_LOSS_DIR)
    if not steps:
      raise FileNotFoundError(f"{path / BEST_LOSS_DIR}: holds no checkpoint")
    tree = _read_named(path / BEST_LOSS_DIR / str(steps[-1]))
  elif (path / "best").is_dir() or (path / "checkpoints").is_dir() or _is_step_dir(path):
    tree = read_state(path)
  elif _is_pytree_dir(path):
    try:
      tree = _read_pytree(path)
    except _Unrestorable as e:
      raise CheckpointError(f"{path}: does not restore ({e})") from None
  else:
    raise FileNotFoundError(f"{path}: not a checkpoint (expected a run workdir, a step directory "
                            "or a checkpoint written by glc_jax.tools.import_torch)")
  if not isinstance(tree, dict) or "params" not in tree:
    raise FileNotFoundError(f"{path}: checkpoint holds no 'params'")
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats") or {}}
