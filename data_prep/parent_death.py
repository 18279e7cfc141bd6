"""Worker processes that end when their parent dies, even by SIGKILL.

A parent killed with SIGKILL (or by the OOM killer) cannot shut its process pool
down, and idle pool workers block forever on a queue whose write end they hold
themselves. This module imports nothing beyond the standard library, so any
worker initializer (data_prep's readers, glc_jax's Grain workers) can use it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
  """Ends the calling (worker) process once process `parent_pid`, its parent, is gone.

  Call it first thing in the worker, e.g. as a pool's initializer with
  `initargs=(os.getpid(),)` evaluated in the parent. On Linux the kernel then
  sends SIGKILL when the parent dies (prctl PR_SET_PDEATHSIG); a daemon thread
  polling os.getppid() covers other systems, and a parent that died before
  the prctl took effect.
  """
  if sys.platform.startswith("linux"):
    try:
      ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
      pass  # no prctl in this libc: the polling thread alone does the job

  def watch():
    while os.getppid() == parent_pid:
      time.sleep(poll_s)
    os._exit(1)  # pylint: disable=protected-access

  if os.getppid() != parent_pid:
    os._exit(1)  # pylint: disable=protected-access
  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
