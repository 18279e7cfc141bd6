"""Pretraining through train.py: a run killed in the middle of an online probe and rerun
matches an uninterrupted run (losses, state and probe history), and fine-tuning starts
from exactly the parameters the pretraining checkpoint holds.

The runs are subprocesses on 2 virtual CPU devices (still a sharded step, with
cross-device BatchNorm and negatives; 8 devices took half as long again, mostly
in Orbax's per-device slicing at the first save) with a ResNet-18 of width 1/8
on 64-pixel views. They share a persistent compilation cache, so only the first
run compiles.
"""
import json
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

from data_prep import convert, synthetic
from glc_jax import checkpoint
from glc_jax.stages import finetune, probe, setup

TOTAL_STEPS = 8
CHECKPOINT_EVERY = 2
# The online probe runs at steps 0, 3, 6 and 8; the killed run dies inside the probe of
# step 6, so it resumes from checkpoint 4, whose history holds a probe (step 3) made
# between checkpoints, and replays steps 5-6 and that probe.
PROBE_EVERY = 3
KILLED_IN_PROBE = 6
RESUMES_FROM = 4
PROBE_STEPS = [0, 3, 6, 8]
MODEL = {"depth": 18, "width": 0.125}
# Fields of a metrics.jsonl record that a resumed run must reproduce (not throughput).
COMPARED = ("loss", "loss_global", "loss_local", "grad_norm", "lr")
PROBE_SCORES = ("probe_oa", "probe_kappa", "probe_miou")

# train.py, with the probe of step KILLED_IN_PROBE marking that it has started (argv[1],
# a file) and then waiting there to be killed: the SIGKILL lands mid-probe, after the
# features, before the head is fitted and scored, on a process whose earlier async
# checkpoint saves have finished.
KILLED_IN_PROBE_TRAIN_PY = f"""
import pathlib, runpy, sys, time
from glc_jax.stages import probe
marker, fit_head = pathlib.Path(sys.argv[1]), probe.OnlineProbe.fit_head
def fit_head_then_wait(self, batches, step):
  if step == {KILLED_IN_PROBE}:
    marker.touch()
    time.sleep(600)
  return fit_head(self, batches, step)
probe.OnlineProbe.fit_head = fit_head_then_wait
sys.argv = sys.argv[2:]
runpy.run_path("train.py", run_name="__main__")
"""


def _load_config(name: str, variant: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _dataset(root: pathlib.Path, bands: int, split_fractions) -> pathlib.Path:
  """4 scenes of 128² → 16 tiles of 64², split by scene."""
  synthetic.write_corpus(root / "corpus", num_scenes=4, height=128, width=128, seed=2, bands=bands)
  return convert.convert(str(root / "corpus" / "images"), root / "dataset",
                         str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64,
                         split_fractions=split_fractions, workers=0, progress=False)


def _records(path: pathlib.Path) -> list[dict]:
  """The complete lines of a metrics.jsonl (the last may be mid-write while a run is going)."""
  text = path.read_text() if path.exists() else ""
  return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _checkpoint_steps(work: pathlib.Path) -> list[int]:
  """Finished checkpoints (Orbax renames a step's temporary directory to its number when done)."""
  root = work / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


class _Runs:
  """The pretraining runs of this module: uninterrupted, and killed then rerun."""

  def __init__(self, root: pathlib.Path):
    # 12 training tiles; the probe fits on 3 of them and is scored on the 4 'val' tiles.
    self.data = _dataset(root, bands=4, split_fractions={"train": 0.75, "val": 0.25})
    self.env = dict(os.environ, JAX_PLATFORMS="cpu",
                    XLA_FLAGS=child_xla_flags(2),
                    JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    self.uninterrupted, self.resumed = root / "uninterrupted", root / "resumed"
    self.probing = root / "probing"

  def command(self, work: pathlib.Path) -> list[str]:
    overrides = {"data.path": self.data, "data.batch_size": 8, "data.num_workers": 0,
                 "model.depth": MODEL["depth"], "model.width": MODEL["width"],
                 "input.view_size": 64, "num_steps": TOTAL_STEPS,
                 "checkpoint_every": CHECKPOINT_EVERY, "log_every": 1,
                 "probe.enabled": True, "probe.every_steps": PROBE_EVERY, "probe.fraction": 0.25,
                 "probe.steps": 5, "probe.batch_size": 8}
    return [sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny",
            f"--workdir={work}", *(f"--config.{k}={v}" for k, v in overrides.items())]

  def run_to_end(self, work: pathlib.Path) -> None:
    done = subprocess.run(self.command(work), env=self.env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

  def run_and_kill(self, work: pathlib.Path) -> tuple[list[dict], int]:
    """Starts a run and SIGKILLs it in the middle of the probe of step KILLED_IN_PROBE.

    The kill waits for the periodic checkpoint RESUMES_FROM to be finished (Orbax
    also saves the very first step; an interval checkpoint resumes from one the
    run chose to write, with a probe history past step 0).

    Returns (the metrics.jsonl records at the kill, the checkpoint step the rerun must resume from).
    """
    command = self.command(work)
    command[1:2] = ["-c", KILLED_IN_PROBE_TRAIN_PY, str(self.probing), "train.py"]
    proc = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
      while not (self.probing.exists() and RESUMES_FROM in _checkpoint_steps(work)):
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "the probe to kill in did not start within the deadline"
        time.sleep(0.02)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return _records(work / "metrics.jsonl"), _checkpoint_steps(work)[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  runs = _Runs(tmp_path_factory.mktemp("resume"))
  runs.run_to_end(runs.uninterrupted)
  runs.killed_records, runs.resume_step = runs.run_and_kill(runs.resumed)
  runs.run_to_end(runs.resumed)
  return runs


@pytest.mark.slow
def test_killed_run_resumes_with_the_losses_of_an_uninterrupted_run(runs):
  # Step 0 is the probe of the untrained network, logged before any update.
  reference = _records(runs.uninterrupted / "metrics.jsonl")
  assert [r["step"] for r in reference] == list(range(TOTAL_STEPS + 1))

  before = runs.killed_records
  assert before[-1]["step"] < TOTAL_STEPS, "the kill came after the run had finished"
  assert before[-1]["step"] > runs.resume_step
  # The rerun replays the steps after its checkpoint, and the log holds each step once.
  records = _records(runs.resumed / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(TOTAL_STEPS + 1))
  for expected, got in zip(reference[1:], records[1:]):
    assert {k: got[k] for k in COMPARED} == {k: expected[k] for k in COMPARED}, expected["step"]
  # The steps logged before the kill and again after it agree too.
  for record in before[1:]:
    assert {k: record[k] for k in COMPARED} == {k: records[record["step"]][k] for k in COMPARED}

  final_reference = checkpoint.read_state(runs.uninterrupted)
  final_resumed = checkpoint.read_state(runs.resumed)
  assert _checkpoint_steps(runs.resumed)[-1] == TOTAL_STEPS
  assert jax.tree.structure(final_resumed) == jax.tree.structure(final_reference)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(final_resumed),
                          jax.tree.leaves(final_reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_run_killed_mid_probe_resumes_with_the_probe_history_of_an_uninterrupted_run(runs):
  # The kill landed inside the probe of step KILLED_IN_PROBE: that step was trained but
  # neither logged nor checkpointed (both come after its probe).
  assert runs.probing.exists()
  assert [r["step"] for r in runs.killed_records] == list(range(KILLED_IN_PROBE))
  assert runs.resume_step == RESUMES_FROM

  reference = probe.read_history(runs.uninterrupted)
  assert [h["step"] for h in reference] == PROBE_STEPS
  assert probe.read_history(runs.resumed) == reference
  # Each probe step is logged once, with the history's scores; the others carry none.
  records = _records(runs.resumed / "metrics.jsonl")
  logged = [{"step": r["step"], **{k: r[k] for k in PROBE_SCORES}}
            for r in records if any(k in r for k in PROBE_SCORES)]
  assert logged == reference
  # The final checkpoint holds the same history as probe.json.
  saved = checkpoint.RunCheckpoints(runs.resumed, every_steps=CHECKPOINT_EVERY)
  try:
    assert saved.probe_history(TOTAL_STEPS) == reference
  finally:
    saved.close()


def _finetune_config(work: pathlib.Path, data: pathlib.Path, transfer: str):
  config = _load_config("finetune", "checkpoint,tiny")
  config.data.path = str(data)
  config.init.path = str(work)
  config.init.transfer = transfer
  config.model.depth, config.model.width = MODEL["depth"], MODEL["width"]
  return config


@pytest.fixture(scope="module")
def fresh_finetune_variables(runs):
  """Stand-ins for a fresh init: random values in the fine-tuning model's shapes (no compile)."""
  config = _finetune_config(runs.uninterrupted, runs.data, "backbone")
  model = finetune.build_model(config, num_classes=6)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, 4), np.float32))
  rng = np.random.default_rng(3)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), shapes)


@pytest.mark.slow
@pytest.mark.parametrize("transfer, roots", [("backbone", ("backbone",)),
                                             ("backbone+encoder", ("backbone", "encoder"))])
def test_finetune_starts_from_the_pretrained_leaves(runs, fresh_finetune_variables, transfer, roots):
  # The oracle: the pretraining run's final state, read straight from its checkpoint.
  saved = checkpoint.read_state(runs.uninterrupted / "checkpoints" / str(TOTAL_STEPS))
  config = _finetune_config(runs.uninterrupted, runs.data, transfer)
  pretrained = finetune.load_pretrained(config, num_bands=4)
  variables, copied = finetune.initial_variables(config, fresh_finetune_variables, pretrained)

  expected_copied = []
  for col in ("params", "batch_stats"):
    fresh = dict(jax.tree_util.tree_leaves_with_path(fresh_finetune_variables[col]))
    got = dict(jax.tree_util.tree_leaves_with_path(variables[col]))
    assert got.keys() == fresh.keys()
    for path, leaf in got.items():
      if path[0].key in roots:
        oracle = saved[col]
        for key in path:
          oracle = oracle[key.key]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(oracle),
                                      err_msg=f"{col}{jax.tree_util.keystr(path)}")
        expected_copied.append(f"{col}/" + "/".join(k.key for k in path))
      else:
        np.testing.assert_array_equal(np.asarray(leaf), fresh[path],
                                      err_msg=f"{col}{jax.tree_util.keystr(path)}")
  assert sorted(copied) == sorted(expected_copied)
  assert any(p.startswith(f"params/{roots[-1]}/") for p in copied)
  assert any(p.startswith("batch_stats/backbone/") for p in copied)  # BN statistics travel too


@pytest.mark.slow
def test_finetune_from_a_4_band_checkpoint_on_3_band_data(runs, tmp_path_factory, monkeypatch):
  data3 = _dataset(tmp_path_factory.mktemp("three_bands"), bands=3,
                   split_fractions={"train": 0.5, "val": 0.5})
  config = _finetune_config(runs.uninterrupted, data3, "backbone+encoder")
  config.data.label_fraction = None
  work = tmp_path_factory.mktemp("ft3") / "work"

  def no_compute(*args, **kwargs):
    raise AssertionError("the band count must be checked before the model is initialised")

  monkeypatch.setattr(finetune.methods, "init_train_state", no_compute)
  with pytest.raises(setup.ConfigError, match=r"^init.path: band count does not match: .* takes 4 "
                                              r"bands .*, data.path has 3$") as error:
    finetune.run(config, str(work))
  assert "\n" not in str(error.value)
  assert not work.exists()
