"""Fine-tuning SIGKILLed at moments around its saves resumes bitwise as an uninterrupted run.

Fine-tuning validates and offers best/ a state at every epoch end (2 steps
here) but writes a periodic checkpoint only every 4 steps, so a kill can leave
best/ ahead of the checkpoint the rerun resumes from. One workdir is killed at
each moment below in turn, each rerun resuming from what the previous kill
left, and a last rerun finishes it; it must then equal an uninterrupted run:
every step logged once with the same values, and the same final and best
states, bit for bit. The runs share a persistent compilation cache, so only the
uninterrupted one compiles; the killed ones stop after a few steps.
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import child_xla_flags

from glc_jax import checkpoint
from test_stages_resume import MODEL, _dataset, _records

EPOCHS, STEPS_PER_EPOCH, CHECKPOINT_EVERY = 4, 2, 4
TMP = ".orbax-checkpoint-tmp"  # Orbax's name for a step still being written


def _names(work: pathlib.Path, sub: str) -> set[str]:
  return {p.name for p in (work / sub).iterdir()} if (work / sub).is_dir() else set()


def _writing(names: set[str], step: int) -> bool:
  return any(n.startswith(f"{step}{TMP}") for n in names)


# (moment, whether the workdir's checkpoints/ and best/ entries show it), in run order.
MOMENTS = [
    # best/2 saved, checkpoint 4 not begun: the rerun resumes from step 1 and
    # replays epoch end 2 (the StepAlreadyExistsError).
    ("best 2 saved, checkpoint 4 not begun",
     lambda ckpt, best: "2" in best and not any(n.startswith("4") for n in ckpt)),
    # best/4 offered, checkpoint 4 being written: again from step 1.
    ("checkpoint 4 in flight", lambda ckpt, best: _writing(ckpt, 4)),
    # best/6 being written: from step 4, with a temporary directory in best/.
    ("best 6 in flight", lambda ckpt, best: "4" in ckpt and _writing(best, 6)),
]


class _Runs:

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.data = _dataset(root, bands=4, split_fractions={"train": 0.5, "val": 0.5})
    self.env = dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS=child_xla_flags(2),
                    JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")

  def command(self, work: pathlib.Path) -> list[str]:
    overrides = {"data.path": self.data, "data.label_fraction": 1.0, "data.batch_size": 4,
                 "data.num_workers": 0, "model.depth": MODEL["depth"],
                 "model.width": MODEL["width"], "input.crop_size": 64, "epochs": EPOCHS,
                 "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1}
    return [sys.executable, "train.py", "--config=configs/finetune.py:random,tiny",
            f"--workdir={work}", *(f"--config.{k}={v}" for k, v in overrides.items())]

  def run_to_end(self, work: pathlib.Path, after: str) -> None:
    done = subprocess.run(self.command(work), env=self.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"rerun after {after!r} failed:\n{done.stderr[-3000:]}"

  def run_and_kill(self, work: pathlib.Path, moment: str, reached) -> None:
    """Runs until the workdir shows `moment` (polled every few ms; saves take ~0.1-1 s), then SIGKILLs."""
    log = self.root / "stderr.txt"  # a file, not a pipe a chatty run could fill and block on
    with open(log, "w") as stderr:
      proc = subprocess.Popen(self.command(work), env=self.env, stdout=subprocess.DEVNULL,
                              stderr=stderr)
    deadline = time.monotonic() + 300
    try:
      while not reached(_names(work, "checkpoints"), _names(work, "best")):
        assert proc.poll() is None, f"the run passed {moment!r} unseen:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {moment!r} within the deadline"
        time.sleep(0.003)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _assert_same_tree(got, want, what):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.slow
def test_finetuning_killed_around_saves_resumes_bitwise(tmp_path):
  runs = _Runs(tmp_path)
  reference, killed = tmp_path / "uninterrupted", tmp_path / "killed"
  runs.run_to_end(reference, after="nothing")
  for moment, reached in MOMENTS:
    runs.run_and_kill(killed, moment, reached)
  runs.run_to_end(killed, after=MOMENTS[-1][0])

  total = EPOCHS * STEPS_PER_EPOCH
  expected, records = _records(reference / "metrics.jsonl"), _records(killed / "metrics.jsonl")
  assert [r["step"] for r in expected] == list(range(1, total + 1))
  assert [r["step"] for r in records] == list(range(1, total + 1))
  for want, got in zip(expected, records):
    want.pop("items_per_s"), got.pop("items_per_s")
    assert got == want  # the loss parts, lr, and the validation scores at epoch ends

  _assert_same_tree(checkpoint.read_state(killed / "checkpoints" / str(total)),
                    checkpoint.read_state(reference / "checkpoints" / str(total)), "final")
  assert _names(killed, "best") == _names(reference, "best")
  _assert_same_tree(checkpoint.read_state(killed), checkpoint.read_state(reference), "best")
