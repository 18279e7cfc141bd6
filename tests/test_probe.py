"""The online segmentation probe: it leaves pretraining bitwise unchanged, its head separates
separable features, and its history lands in the log, the checkpoints and probe.json.

Pretraining runs in-process on the 8 virtual devices with a ResNet-18 of width 1/8 on
32-pixel views, 4 steps; the runs share compiled steps through the persistent cache.
"""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from data_prep import convert, synthetic
from glc_jax import checkpoint, parallel
from glc_jax.models.probe import ProbeSegmenter
from glc_jax.stages import finetune, pretrain, probe as probe_lib, run_dir, setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
SCORES = ("probe_oa", "probe_kappa", "probe_miou")


def pretrain_config(data: pathlib.Path, probe: bool, **probe_keys):
  spec = importlib.util.spec_from_file_location("pretrain_cfg", ROOT / "configs" / "pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("glcnet,tiny")
  c.data.path, c.data.batch_size, c.data.num_workers = str(data), 8, 0
  c.model.depth, c.model.width = 18, 0.125
  c.input.view_size, c.input.patch_size = 32, 8
  c.num_steps, c.checkpoint_every, c.log_every = STEPS, 2, 1
  c.optimizer.reference_batch = 8
  c.probe.update(dict(enabled=probe, every_steps=2, fraction=0.25, steps=5, batch_size=8),
                 **probe_keys)
  return c


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """4 scenes of 128² → 16 tiles of 64², half train, half val (0.25 of train = 2 tiles)."""
  root = tmp_path_factory.mktemp("probe_data")
  synthetic.write_corpus(root / "corpus", num_scenes=4, height=128, width=128, seed=3, bands=4)
  return convert.convert(str(root / "corpus" / "images"), root / "dataset",
                         str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64,
                         split_fractions={"train": 0.5, "val": 0.5}, workers=0, progress=False)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
  root = tmp_path_factory.mktemp("probe_runs")
  for probe in (False, True):
    pretrain.run(pretrain_config(data, probe), str(root / f"probe_{probe}"))
  return root


def _records(work: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_probe_leaves_the_pretraining_state_bitwise_unchanged(runs):
  without = checkpoint.read_state(runs / "probe_False")
  with_probe = checkpoint.read_state(runs / "probe_True")
  # The whole TrainState: step, params, batch_stats, opt_state, extras.
  assert jax.tree.structure(with_probe) == jax.tree.structure(without)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(with_probe),
                          jax.tree.leaves(without)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  plain, probed = _records(runs / "probe_False"), _records(runs / "probe_True")
  assert [r["step"] for r in probed] == list(range(STEPS + 1))
  for a, b in zip(plain, probed[1:]):
    assert {k: a[k] for k in a if k != "items_per_s"} == {k: b[k] for k in a if k != "items_per_s"}


@pytest.mark.slow
def test_probe_history_in_log_checkpoints_and_probe_json(runs):
  records = {r["step"]: r for r in _records(runs / "probe_True")}
  history = probe_lib.read_history(runs / "probe_True")
  assert [h["step"] for h in history] == [0, 2, 4]
  for entry in history:
    assert set(entry) == {"step", *SCORES}
    assert 0.0 <= entry["probe_oa"] <= 1.0 and 0.0 <= entry["probe_miou"] <= 1.0
    assert {k: records[entry["step"]][k] for k in SCORES} == {k: entry[k] for k in SCORES}
  assert not any(k in records[s] for s in (1, 3) for k in SCORES)
  saved = checkpoint.RunCheckpoints(runs / "probe_True", every_steps=2)
  try:
    assert saved.probe_history(STEPS) == history
    assert saved.probe_history(2) == history[:2]
  finally:
    saved.close()
  assert probe_lib.read_history(runs / "probe_False") == []
  # The health signals come with every step (GLCNet: global and local embeddings).
  for key in ("embed_std_global", "embed_std_local", "cos_pos_global", "cos_neg_local",
              "patch_valid_fraction", "lr", "grad_norm"):
    assert all(key in records[s] for s in range(1, STEPS + 1)), key


class _Crash(Exception):
  """Stands for the process dying in the middle of a probe."""


@pytest.mark.slow
def test_run_stopped_mid_probe_resumes_with_the_same_history(runs, data, tmp_path, monkeypatch):
  work = tmp_path / "work"
  scored = []
  make_validator = finetune.make_validator

  def crashing_validator(*args, **kwargs):
    validate = make_validator(*args, **kwargs)

    def run(state):
      scored.append(True)
      if len(scored) == 3:  # the probe of step 4, after those of steps 0 and 2
        raise _Crash
      return validate(state)
    return run

  monkeypatch.setattr(finetune, "make_validator", crashing_validator)
  with pytest.raises(_Crash):
    pretrain.run(pretrain_config(data, True), str(work))
  monkeypatch.undo()
  steps = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 2, steps  # step 4 died in its probe, before its checkpoint
  assert not (work / probe_lib.HISTORY_FILE).exists()

  pretrain.run(pretrain_config(data, True), str(work))
  reference = probe_lib.read_history(runs / "probe_True")
  assert probe_lib.read_history(work) == reference
  records = [r for r in _records(work) if "probe_oa" in r]
  assert [{k: r[k] for k in ("step", *SCORES)} for r in records] == reference


def test_probe_interval_may_change_on_resume_but_not_what_it_measures(runs, data):
  config = pretrain_config(data, True)
  work = runs / "probe_True"
  assert run_dir.config_changes(work, config) == {}
  config.probe.every_steps = 3
  assert run_dir.config_changes(work, config) == {"probe.every_steps": (2, 3)}
  for key, value in (("head", "decoder"), ("fraction", 0.5), ("steps", 6), ("enabled", False)):
    changed = pretrain_config(data, True, **{key: value})
    with pytest.raises(run_dir.ConfigChangedError, match=f"probe.{key}"):
      run_dir.config_changes(work, changed)


@pytest.fixture(scope="module")
def probe(data):
  config = pretrain_config(data, True, steps=200)
  return probe_lib.OnlineProbe(config, parallel.make_data_mesh(), jax.random.key(7))


def _codes(num_classes: int, channels: int = 32) -> np.ndarray:
  """One unit vector per class (channels: the encoder's 256 at width 1/8)."""
  code = np.random.default_rng(0).normal(size=(num_classes, channels)).astype(np.float32)
  return code / np.linalg.norm(code, axis=1, keepdims=True)


def _separable(codes: np.ndarray, seed: int, n: int = 16, size: int = 8):
  """(features, labels): each pixel its class's code ×3 plus noise of std 0.1."""
  rng = np.random.default_rng(seed)
  label = rng.integers(0, len(codes), (n, size, size)).astype(np.int32)
  noise = 0.1 * rng.normal(size=label.shape + codes.shape[1:]).astype(np.float32)
  return 3 * codes[label] + noise, label


def _head_batch(features, label):
  sharding = parallel.batch_sharding(parallel.make_data_mesh())
  return {"encoder": jax.device_put(features, sharding), "label": jax.device_put(label, sharding)}


def _accuracy(probe, head, features, label) -> float:
  logits = probe.model.apply({"params": jax.device_get(head.params)}, {"encoder": features},
                             label.shape[1:], train=False, method=ProbeSegmenter.classify)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == label))


def test_probe_head_separates_linearly_separable_features(probe):
  """A linear head fitted by the probe's own steps on separable features: >= 99% held-out OA.

  The labels are at the features' resolution, so the head's upsampling is the
  identity and a perfect linear classifier exists.
  """
  codes = _codes(probe.model.num_classes)
  head = probe.fit_head([_head_batch(*_separable(codes, seed=0))], step=0)
  assert _accuracy(probe, head, *_separable(codes, seed=1)) >= 0.99


def test_untrained_head_does_not_separate_them(probe):
  """The check above can fail: the head at its initialisation is far from it."""
  codes = _codes(probe.model.num_classes)
  head = probe.fit_head([_head_batch(*_separable(codes, seed=0))], step=0)
  untrained = probe._fresh_head(_head_batch(*_separable(codes, seed=0)))  # pylint: disable=protected-access
  assert _accuracy(probe, untrained, *_separable(codes, seed=1)) < 0.6
  assert not np.array_equal(np.asarray(head.params["head"]["kernel"]),
                            np.asarray(untrained.params["head"]["kernel"]))


@pytest.mark.parametrize("key, value, message", [
    ("head", "mlp", r"^config key probe.head is 'mlp'; expected one of \('linear', 'decoder'\)$"),
    ("eval_split", "train", r"^probe.eval_split must differ from probe.split \('train'\)"),
    ("fraction", 0.3, r"^probe.fraction: subset fraction 0.3 not stored for split 'train'"),
    ("eval_split", "test", r"^probe.eval_split: "),
    ("batch_size", 6, r"probe.batch_size"),
    ("lr", 0.0, r"^config key probe.lr is 0.0; expected a positive number$"),
    ("every_steps", 0, r"^config key probe.every_steps is 0; expected an integer >= 1$"),
])
def test_bad_probe_keys_are_one_line_errors(data, tmp_path, key, value, message):
  config = pretrain_config(data, True, **{key: value})
  with pytest.raises(setup.ConfigError, match=message) as error:
    pretrain.run(config, str(tmp_path / "work"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "work").exists()


def test_summary_line():
  history = [{"step": 0, "probe_oa": 0.5, "probe_kappa": 0.0, "probe_miou": 0.1},
             {"step": 42, "probe_oa": 0.75, "probe_kappa": 0.5, "probe_miou": 0.3125}]
  assert probe_lib.summary(history, "val") == (
      "Online probe (a head on the frozen features, scored on the 'val' split): mIoU 10.00%, "
      "OA 50.00% at step 0 (untrained) → mIoU 31.25%, OA 75.00% at step 42")


def test_probe_eval_fraction_can_be_set_on_the_command_line():
  """Its default is None, which a plain None would leave without a type to parse a flag into."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  def parse(*overrides):
    argv = ["train.py", "--config=configs/pretrain.py:glcnet,tiny", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config

  assert parse("--config.probe.eval_fraction=0.05").probe.eval_fraction == 0.05
  assert parse().probe.eval_fraction is None
