"""The output folder of a conversion: one run at a time, leftovers of killed runs,
and replacing only what data_prep made.

A run holds an exclusive flock on `.NAME.lock`, beside the dataset, for as long
as it works on NAME. The kernel releases a flock when its holder dies, however
it dies, so a lock that can be taken means no run is live: every
`.NAME.incomplete-PID` or `.NAME.old-PID` folder is then a leftover to delete.
The PID in those names only tells a human who made them; PIDs are reused.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

from data_prep.errors import DataPrepError
from data_prep.writer import DATASET_NAME, SHARD_SUFFIX

_METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")
_SHARD_NAME = re.compile(rf"{re.escape(DATASET_NAME)}-\w+\.{SHARD_SUFFIX}-\d{{5}}-of-\d{{5}}")


def _lock_path(out: Path) -> Path:
  return out.parent / f".{out.name}.lock"


def temp_folder(out: Path) -> Path:
  """Where this process builds the dataset before it is moved to `out`."""
  return out.parent / f".{out.name}.incomplete-{os.getpid()}"


@contextlib.contextmanager
def lock(out: Path) -> Iterator[None]:
  """Holds the lock on dataset `out` (whose parent folder must exist).

  Raises:
    DataPrepError: a live run holds it (the message names its pid).
    OSError: the lock file cannot be created (read-only or full file system).
  """
  path = _lock_path(out)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      raise DataPrepError(f"{out}: another data_prep run (pid {holder}) is writing this dataset") from None
    # A run that just finished unlinks the file it locked; we may hold that
    # orphaned inode, which a third run would not see. Lock what `path` is now.
    try:
      current = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      current = False
    if current:
      break
    os.close(fd)
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)  # while still locked, so no other run can hold this inode
    os.close(fd)


def remove_leftovers(out: Path) -> None:
  """Deletes temp folders of dead runs; call only while holding `lock(out)`."""
  for stale in [*out.parent.glob(f".{out.name}.incomplete-*"), *out.parent.glob(f".{out.name}.old-*")]:
    if stale.is_dir() and not stale.is_symlink():
      shutil.rmtree(stale)
    else:
      stale.unlink()


def _is_dataset_file(name: str) -> bool:
  return name in _METADATA_FILES or _SHARD_NAME.fullmatch(name) is not None


def _made_by_data_prep(out: Path) -> bool:
  try:
    info = json.loads((out / "dataset_info.json").read_text())
    metadata = json.loads((out / "metadata.json").read_text())
  except (OSError, ValueError):
    return False
  return (isinstance(info, dict) and info.get("name") == DATASET_NAME
          and isinstance(metadata, dict) and "format_version" in metadata and "fingerprint" in metadata)


def check_replaceable(out: Path, overwrite: bool) -> None:
  """Refuses, in one line, to replace an existing `out` that data_prep did not make.

  An empty folder is free to use, unless it is a mount point. A data_prep dataset is replaced only with
  `overwrite` and only if it holds nothing but data_prep's own files.
  """
  if not out.exists() and not out.is_symlink():
    return
  if os.path.ismount(out):
    # Found before any work: the final rename would fail (EBUSY) after the whole conversion.
    raise DataPrepError(f"{out}: is a mount point, which data_prep cannot replace (it builds the "
                        "dataset beside --out and renames it into place); use a folder inside it, "
                        f"e.g. --out {out / 'dataset'}")
  if not out.is_dir() or out.is_symlink():
    kind = "a symbolic link" if out.is_symlink() else "a file"
    raise DataPrepError(f"{out}: exists and is not a data_prep dataset but {kind}; "
                        "data_prep replaces only datasets it made: choose another --out")
  entries = sorted(p.name for p in out.iterdir())
  if not entries:
    return
  if not _made_by_data_prep(out):
    raise DataPrepError(f"{out}: already exists and is not a data_prep dataset; "
                        "data_prep replaces only datasets it made: choose another --out")
  foreign = [name for name in entries if not _is_dataset_file(name) or (out / name).is_dir()]
  if foreign:
    raise DataPrepError(f"{out}: this data_prep dataset also holds {foreign[0]!r}, which data_prep did "
                        "not write; move it elsewhere before replacing the dataset")
  if not overwrite:
    raise DataPrepError(f"{out}: already exists and is a dataset built with other settings or inputs; "
                        "pass --overwrite to replace it")


def move_into_place(tmp: Path, out: Path) -> None:
  """Renames the finished `tmp` to `out`, replacing what `check_replaceable` allowed."""
  if not out.exists():
    tmp.rename(out)
    return
  old = out.parent / f".{out.name}.old-{os.getpid()}"
  out.rename(old)
  try:
    tmp.rename(out)
  except BaseException:
    old.rename(out)
    raise
  shutil.rmtree(old, ignore_errors=True)  # what remains, the next run's remove_leftovers deletes
