"""A run's workdir: one run at a time, and a resumed run keeps the config it started with.

What a training stage keeps in its workdir (besides checkpoints and logs):
  run.lock             exists while a run holds the workdir: an flock held for
                       the run's lifetime (the kernel drops it when the process
                       dies, however it dies), and the holder's pid, host and
                       start time for the message a second run gets
  config.json          the config the run started with, never rewritten
  config_changes.jsonl one line per resume that changed a resumable key
  dataset.json         a digest of what the dataset the run started on holds
                       (source.content_id); a resume on a dataset rebuilt since
                       with other contents under the same path is refused

A workdir holding a checkpoint is resumed; the new config must then equal the
stored one (config.json with the recorded changes applied) except in
RESUMABLE_KEYS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from glc_jax import checkpoint, files
from glc_jax.data import source
from glc_jax.stages import setup

LOCK_FILE = "run.lock"
CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.jsonl"
DATASET_FILE = "dataset.json"

# Keys that change how long a run goes on or how it reports, not what it computes
# up to the resume point. data.num_workers is not one: Grain's iterator state
# records one position per worker and restores only into the same worker count.
# num_steps and epochs also set the length of a cosine lr schedule, which is rebuilt for the
# new length and read at the resume step on, so the lr jumps there (docs/workdirs.md).
# probe.every_steps only changes when the online probe looks; its other keys change what a
# score means, so that the history would mix incomparable numbers.
# early_stopping.patience only decides when fine-tuning ends, like epochs.
RESUMABLE_KEYS = frozenset({"num_steps", "epochs", "log_every", "checkpoint_every",
                            "keep_checkpoints", "probe.every_steps", "early_stopping.patience",
                            "validate_every_epochs"})

# Keys added to the configs after runs may have started, each with the value that computes
# what the code did before it: a run stored without one resumes when it has that value.
ADDED_KEYS = {"model.bn_momentum": 0.9}

_ABSENT = "<absent>"
_MESSAGE_BYTES = 4096  # a refusal broadcast from process 0 to the others


class WorkdirBusyError(setup.ConfigError):
  """Another live run holds the workdir."""


class ConfigChangedError(setup.ConfigError):
  """A resumed run's config differs from its stored one in keys that may not change."""


def _json_tree(config: ml_collections.ConfigDict) -> dict:
  """The config as config.json stores it (tuples become lists, other types their str)."""
  return json.loads(json.dumps(config.to_dict(), default=str))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
  """A config.json tree as {dotted key: value}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# Keys naming a file or folder: the same place written relative or absolute is no change.
PATH_KEYS = frozenset({"data.path", "init.path", "checkpoint"})


def _absolute_paths(tree: dict) -> dict:
  """`tree` (a config as a dict) with its PATH_KEYS values made absolute, as config.json keeps
  them: a relative one would be read later from another folder (evaluation opens the training
  dataset named there). URLs (gs://...) are left as they are."""
  for key in PATH_KEYS:
    *parents, name = key.split(".")
    node = tree
    for part in parents:
      node = node.get(part) if isinstance(node, dict) else None
    value = node.get(name) if isinstance(node, dict) else None
    if isinstance(value, str) and value:
      node[name] = absolute_path(value)
  return tree


def absolute_path(path: str) -> str:
  """`path` made absolute, a URL (gs://...) as it is."""
  return path if "://" in path else os.path.abspath(path)


def _same(key: str, old: Any, new: Any) -> bool:
  if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
    return absolute_path(old) == absolute_path(new)
  return old == new


def differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple]:
  """{dotted key: (old value, new value)} where two flattened configs differ, sorted by key; a
  key one of them lacks reads '<absent>' there."""
  return {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(set(old) | set(new))
          if not _same(k, old.get(k, _ABSENT), new.get(k, _ABSENT))}


def differing_keys(stored: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """differences between a flattened stored config and `config`."""
  return differences(stored, flatten(_json_tree(config)))


def run_config_of(checkpoint_path: str, key: str) -> dict:
  """The config.json of the run a checkpoint belongs to (the workdir's, for a step directory in
  it), or {} where there is none (an imported checkpoint); `key` names the path in errors."""
  path = checkpoint.run_workdir(checkpoint_path) / CONFIG_FILE
  if not path.is_file():
    return {}
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise setup.ConfigError(f"{key}: {path}: unreadable ({e})") from None
  if not isinstance(saved, dict):
    raise setup.ConfigError(f"{key}: {path}: not a config (a JSON object)")
  return saved


def holds_checkpoint(work: pathlib.Path) -> bool:
  """Whether a run has saved a step here (Orbax names a finished step by its number)."""
  return any(checkpoint.saved_steps(work / sub) for sub in ("checkpoints", "best"))


def stored_config(work: pathlib.Path) -> dict[str, Any]:
  """config.json flattened to dotted keys, with the accepted changes applied in order."""
  path = work / CONFIG_FILE
  try:
    flat = flatten(json.loads(path.read_text()))
    lines = (work / CHANGES_FILE).read_text().splitlines() if (work / CHANGES_FILE).exists() else []
    for line in lines:
      for key, change in json.loads(line)["changes"].items():
        flat[key] = change["to"]
  except FileNotFoundError:
    raise setup.ConfigError(f"{path} is missing, but {work} holds checkpoints: the config they "
                            "were made with is unknown; use another workdir") from None
  except (ValueError, KeyError, TypeError) as e:
    raise setup.ConfigError(f"{path.parent}: unreadable {path.name} or {CHANGES_FILE} "
                            f"({type(e).__name__}: {e})") from None
  return flat


def config_changes(work: pathlib.Path, config: ml_collections.ConfigDict,
                   total_steps: int | None = None) -> dict[str, tuple]:
  """{dotted key: (stored, new)} of a resumed run; {} for a fresh one.

  Raises ConfigChangedError naming every changed key outside RESUMABLE_KEYS, or the stage
  alone when config.json is another stage's (with or without checkpoints: an evaluation's has none).
  """
  try:
    stage = json.loads((work / CONFIG_FILE).read_text()).get("stage")
  except (OSError, ValueError, AttributeError):
    stage = None  # no config.json, or one stored_config names as unreadable below
  if stage is not None and stage != config.get("stage"):
    raise ConfigChangedError(f"workdir {work} holds {'an' if str(stage)[:1] in 'aeiou' else 'a'} "
                             f"{stage} run; use another --workdir")
  if not holds_checkpoint(work):
    return {}
  old = stored_config(work)
  added = {k: v for k, v in ADDED_KEYS.items() if k in flatten(_json_tree(config))}
  changes = differing_keys({**added, **old}, config)
  refused = [k for k in changes if k not in RESUMABLE_KEYS]
  if refused:
    listed = ", ".join(f"{k} {changes[k][0]!r} → {changes[k][1]!r}" for k in refused)
    raise ConfigChangedError(
        f"{work} holds a run started with another config: {listed}; a resumed run may only "
        f"change {', '.join(sorted(RESUMABLE_KEYS))}. Use another workdir for a new run")
  _check_length_change(work, config, changes, total_steps or config.get("num_steps") or None)
  return changes


def _check_length_change(work: pathlib.Path, config: ml_collections.ConfigDict,
                         changes: dict[str, tuple], total_steps: int | None) -> None:
  """Refuses a length change that would not do what it says: epochs while num_steps sets the
  length, or a new length (`total_steps`, the stage's count) below the step the run has
  reached (nothing to train, and the reached step's state would stand as the end of a
  shorter run)."""
  num_steps = config.get("num_steps") or 0
  if "epochs" in changes and num_steps:
    old, new = changes["epochs"]
    raise ConfigChangedError(f"{work}: epochs {old} → {new} changes nothing while num_steps is "
                             f"{num_steps} (it sets the length unless it is 0); change num_steps")
  if not changes.keys() & {"num_steps", "epochs"} or total_steps is None:
    return
  reached = max(checkpoint.saved_steps(work / "checkpoints"), default=0)
  if total_steps < reached:
    listed = ", ".join(f"{k} {changes[k][0]!r} → {changes[k][1]!r}"
                       for k in ("num_steps", "epochs") if k in changes)
    raise ConfigChangedError(f"{work}: with {listed} the run is {total_steps} steps long, below "
                             f"step {reached}, which it has reached; use another workdir for a "
                             "shorter run")


def _describe_holder(fd: int) -> str:
  try:
    holder = json.loads(os.pread(fd, _MESSAGE_BYTES, 0) or b"{}")
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
  except (ValueError, KeyError, TypeError):
    return "it has not yet written its pid"


def _lock(work: pathlib.Path) -> int:
  """An open, flock-ed descriptor of the workdir's lock file; WorkdirBusyError if another holds it."""
  path = work / LOCK_FILE
  for _ in range(100):
    try:
      work.mkdir(parents=True, exist_ok=True)
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # the previous holder removed its fresh, empty workdir
      continue
    except OSError as e:
      raise setup.ConfigError(f"{work}: cannot write the workdir ({e.strerror})") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _describe_holder(fd)
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES):
        raise WorkdirBusyError(f"{work} is in use by another run ({holder}); wait for it to end "
                               "or use another workdir") from None
      raise setup.ConfigError(f"{path}: cannot lock it ({e.strerror}); put the workdir on a "
                              "file system with file locks") from None
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
      os.ftruncate(fd, 0)
      os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": started}).encode(), 0)
      return fd
    # The holder unlinked the file between our open and our flock: lock the new one.
    os.close(fd)
  raise WorkdirBusyError(f"{path}: could not take the lock (it keeps being replaced)")


def _unlock(work: pathlib.Path, fd: int, made_workdir: bool) -> None:
  # Unlink before unlocking: a run that opened the old file sees it replaced and retries.
  with contextlib.suppress(FileNotFoundError):
    os.unlink(work / LOCK_FILE)
  os.close(fd)
  if made_workdir:
    with contextlib.suppress(OSError):  # not empty: the run wrote something, keep it
      work.rmdir()


def _agree(error: str) -> str:
  """Process 0's refusal (or '') on every process, so that all stop together."""
  if jax.process_count() == 1:
    return error
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  message = np.frombuffer(error.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0"), np.uint8)
  shared = multihost_utils.broadcast_one_to_all(message)
  return bytes(np.asarray(shared, np.uint8)).rstrip(b"\0").decode(errors="replace")


def check_same_dataset(work: pathlib.Path, config: ml_collections.ConfigDict,
                       content_id: str) -> None:
  """Refuses to resume on a dataset other than the one the run started on: data.path compares as
  a place, and a dataset rebuilt there since (other tiles, records, statistics) would go unseen
  while the restored data position and schedule belong to the old one. Workdirs made before
  dataset.json was kept, or that keep an earlier form of it (no content_id), are not checked."""
  if not holds_checkpoint(work) or not (work / DATASET_FILE).exists():
    return
  try:
    started_on = json.loads((work / DATASET_FILE).read_text()).get("content_id")
  except (OSError, ValueError, AttributeError) as e:
    raise setup.ConfigError(f"{work}: unreadable {DATASET_FILE} ({type(e).__name__}: {e})") from None
  if started_on is not None and started_on != content_id:
    raise ConfigChangedError(
        f"data.path: {config.data.path} holds another dataset than the one the run in {work} "
        "started on (other tiles, scenes, statistics or subsets: rebuilt since?); resuming would "
        "go on with other data: use another --workdir")


def check_not_in_dataset(work: pathlib.Path) -> None:
  """Refuses a workdir that is a data_prep dataset or lies inside one (the dataset's path typed
  for --workdir): a run's files there would make data_prep refuse to replace the dataset."""
  for folder in (work, *work.parents):
    if source.is_dataset(folder):
      where = "holds" if folder == work else f"is inside {folder}, which holds"
      raise setup.ConfigError(f"workdir {work} {where} a data_prep dataset; use another --workdir")


@dataclasses.dataclass
class Claim:
  """A workdir held by this run; `changes` are the accepted config changes of a resume."""
  path: pathlib.Path
  config: ml_collections.ConfigDict | None
  changes: dict[str, tuple]
  dataset_id: str | None = None

  def record_config(self, desc: str) -> None:
    """Writes config.json for a fresh run, or records a resume's accepted changes (process 0)."""
    if jax.process_index() != 0 or self.config is None:
      return
    if not holds_checkpoint(self.path):
      files.write_text_atomic(self.path / CONFIG_FILE,
                              json.dumps(_absolute_paths(self.config.to_dict()), indent=2,
                                         default=str) + "\n")
      if self.dataset_id is not None:
        files.write_text_atomic(self.path / DATASET_FILE, json.dumps(
            {"data.path": absolute_path(self.config.data.path), "content_id": self.dataset_id},
            indent=2) + "\n")
    elif self.changes:
      record = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "changes": {k: {"from": old, "to": new} for k, (old, new) in self.changes.items()}}
      with open(self.path / CHANGES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
      listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in self.changes.items())
      # docs/workdirs.md: the schedule is the new length's, evaluated from the resume step on.
      rescheduled = (self.changes.keys() & {"num_steps", "epochs"}
                     and self.config.get("optimizer", {}).get("schedule") == "cosine")
      schedule = ("; the lr schedule is now the cosine of a run of the new length, so the lr "
                  "may change at the resume step" if rescheduled else "")
      print(f"{desc}: resuming {self.path} with {listed} (recorded in {CHANGES_FILE}){schedule}")


@contextlib.contextmanager
def claim(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None,
          dataset_id: str | None = None,
          total_steps: int | None = None) -> Iterator[Claim]:
  """Holds `workdir` for the block: one run at a time, a resume only with resumable changes.

  Process 0 takes the lock and checks `config` (None: no resume check, e.g.
  the demo) against the stored one, a new length against the step reached (`total_steps`, the
  stage's count), and `dataset_id` (source.content_id of data.path) against the one the run
  started on (check_same_dataset); every process raises its refusal.
  A workdir this call created is removed again if the block leaves it empty.
  """
  work = pathlib.Path(workdir).absolute()
  fd, made, changes, refusal = None, False, {}, None
  if jax.process_index() == 0:
    made = not work.exists()
    try:
      check_not_in_dataset(work)
      fd = _lock(work)
      if config is not None:
        changes = config_changes(work, config, total_steps)
        if dataset_id is not None:
          check_same_dataset(work, config, dataset_id)
    except setup.ConfigError as e:
      refusal = e
      if fd is not None:
        _unlock(work, fd, made)
        fd = None
  message = _agree(str(refusal) if refusal else "")
  if refusal is not None:
    raise refusal
  if message:
    raise setup.ConfigError(message)
  try:
    yield Claim(work, config, changes, dataset_id)
  finally:
    if fd is not None:
      _unlock(work, fd, made)
