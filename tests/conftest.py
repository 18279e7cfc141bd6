"""Test set-up: 8 virtual CPU devices, so every sharded path runs in CI.

XLA_FLAGS must be set before jax is first imported, which is why this happens at
module import time rather than in a fixture.
"""
import atexit
import os
import shutil
import signal
import tempfile

# LLVM optimisation level 0: the suite's programs are tiny and run a few steps,
# so compiling dominates; level 0 halves the compile time of a train step (and
# the test time), and the values agree within the tests' float32 tolerances.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def child_xla_flags(device_count: int) -> str:
  """XLA_FLAGS for a child process (train.py, a multi-host worker): the suite's, with its own device count."""
  return f"--xla_force_host_platform_device_count={device_count} {FAST_COMPILE}"


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + child_xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by the child
# processes (train.py runs, killed and resumed runs): a program compiled once,
# in this process or a child, is not compiled again. Compiling dominates the
# suite's time.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="glc_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tiny network settings shared by tests so that compiled functions are reused.
TINY_IMAGE_SIZE = 64
TINY_BANDS = 4


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests expect 8 virtual CPU devices"
  return jax.devices()


def assert_tree_close(got, want, what, rtol=1e-5, leaf_rtol=1e-4):
  """Whole tree: ||got - want|| <= rtol ||want|| (2-norms over all leaves);
  each leaf: max |got - want| <= leaf_rtol * max |want|.

  The per-leaf bound is looser because a few leaves (e.g. a head's bias,
  whose gradient is a sum that nearly cancels) are small results of large
  sums, where a different summation order costs more relative digits; a
  real sharding error (a missing or doubled reduction) is off by O(1).
  """
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_want = jax.tree.leaves(want)
  assert len(flat_got) == len(flat_want), what
  # Leaves that are zero up to rounding (a conv bias feeding BatchNorm gets
  # no gradient in exact arithmetic) are judged against the tree's scale.
  floor = 1e-2 * max((np.abs(np.asarray(w)).max() for w in flat_want),
                     default=0.0)
  diff2 = norm2 = 0.0
  for (path, g), w in zip(flat_got, flat_want):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    diff2 += np.sum((g - w) ** 2)
    norm2 += np.sum(w ** 2)
    err = np.abs(g - w).max() / max(np.abs(w).max(), floor, 1e-20)
    assert err <= leaf_rtol, (f"{what}{jax.tree_util.keystr(path)}: relative "
                              f"difference {err:.2e}")
  total = np.sqrt(diff2) / max(np.sqrt(norm2), 1e-20)
  assert total <= rtol, f"{what}: relative difference {total:.2e}"


def assert_ignore_sigint(processes) -> None:
  """Each process (multiprocessing.Process) has SIGINT ignored, read from /proc: a terminal's
  Ctrl-C reaches the whole process group, and a worker that took it would print its own
  KeyboardInterrupt traceback above the parent's one line."""
  assert processes
  for process in processes:
    ignored = int(next(line.split()[1] for line in open(f"/proc/{process.pid}/status")
                       if line.startswith("SigIgn:")), 16)
    assert ignored & (1 << (signal.SIGINT - 1)), f"{process.name} would take the Ctrl-C"

