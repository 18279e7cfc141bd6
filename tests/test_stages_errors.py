"""Stages refuse bad configs before any compute, with one-line messages naming the key."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from data_prep import convert, synthetic
from glc_jax.stages import finetune, pretrain, setup

from conftest import assert_ignore_sigint


def _config(path, variant="glcnet,tiny", **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("pretrain_cfg", "configs/pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.data.path = str(path)
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("stages")
  synthetic.write_corpus(root / "corpus", num_scenes=2, height=128, width=128, seed=1)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, progress=False)


def test_missing_dataset_is_named(tmp_path):
  with pytest.raises(setup.ConfigError, match=r"data.path: .*nowhere.*no finished data_prep dataset"):
    pretrain.run(_config(tmp_path / "nowhere"), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_batch_not_divisible_by_devices(dataset, tmp_path):
  with pytest.raises(setup.ConfigError, match=r"data.batch_size 6 is not a positive multiple of the 8"):
    pretrain.run(_config(dataset, **{"data.batch_size": 6}), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_finetune_needs_distinct_validation_split(dataset, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("ft_cfg", "configs/finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("random,tiny")
  config.data.path = str(dataset)
  config.data.val_split = "train"
  config.data.label_fraction = 1.0
  with pytest.raises(setup.ConfigError, match="val_split must differ"):
    finetune.run(config, str(tmp_path / "work"))


@pytest.mark.parametrize("override, message", [
    ("data.nope=1", "unknown config key data.nope; see the config file for valid keys"),
    ("data.batchsize=4", "unknown config key data.batchsize (did you mean data.batch_size?)"),
    ("dat.batch_size=4", "unknown config key dat.batch_size (did you mean data.batch_size?)"),
    ("data.batch_size.x=1", "unknown config key data.batch_size.x; see the config file for valid keys"),
])
def test_train_py_unknown_key_is_one_line(tmp_path, override, message):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny",
                           f"--workdir={tmp_path}/w", "--config.seed=3", f"--config.{override}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [f"error: {message}"]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("entry", [["train.py"], ["-m", "glc_jax.benchmark"]])
def test_missing_config_file_is_one_line(entry, tmp_path):
  result = subprocess.run([sys.executable, *entry, "--config=configs/nothere.py", f"--workdir={tmp_path}/w"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "error: --config: [Errno 2] No such file or directory: 'configs/nothere.py'"]
  assert not (tmp_path / "w").exists()


def _finetune_config(path, variant="random,tiny", **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("ft_cfg", "configs/finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  config.data.path = str(path)
  config.data.val_split = "val"
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  return config


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
  """4 scenes split train/val/test by scene, with the default labelled subsets of train."""
  root = tmp_path_factory.mktemp("labelled")
  synthetic.write_corpus(root / "corpus", num_scenes=4, height=128, width=128, seed=3)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         split_fractions={"train": 0.5, "val": 0.25, "test": 0.25}, progress=False)


@pytest.fixture
def no_compute(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the config must be checked before the model is initialised")

  monkeypatch.setattr(pretrain.methods, "init_train_state", refuse)
  monkeypatch.setattr(finetune.methods, "init_train_state", refuse)


@pytest.mark.parametrize("key, value, message", [
    ("epochs", 0, r"^config key epochs is 0; expected an integer >= 1$"),
    ("num_steps", -3, r"^config key num_steps is -3; expected an integer >= 0$"),
    ("checkpoint_every", 0, r"^config key checkpoint_every is 0; expected an integer >= 1$"),
    ("log_every", -1, r"^config key log_every is -1; expected an integer >= 1$"),
    ("keep_checkpoints", 0, r"^config key keep_checkpoints is 0; expected an integer >= 1$"),
])
def test_pretrain_counts_out_of_range(dataset, tmp_path, no_compute, key, value, message):
  config = _config(dataset, **{"data.batch_size": 8})
  config[key] = value
  with pytest.raises(setup.ConfigError, match=message):
    pretrain.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_finetune_zero_epochs(labelled, tmp_path, no_compute):
  with pytest.raises(setup.ConfigError, match=r"^config key epochs is 0; expected an integer >= 1$"):
    finetune.run(_finetune_config(labelled, epochs=0, **{"data.label_fraction": 1.0}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_train_py_epochs_zero_is_one_line(dataset, tmp_path):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny",
                           f"--workdir={tmp_path}/w", f"--config.data.path={dataset}",
                           "--config.data.batch_size=8", "--config.epochs=0"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: config key epochs is 0; expected an integer >= 1"), result.stderr[-2000:]
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"data.label_fraction": 0.3},
     r"^data.label_fraction: subset fraction 0.3 not stored for split 'train'; available: "),
    ({"data.split": "nope"}, r"^data.split: .*: no split 'nope'; splits are \['test', 'train', 'val'\]$"),
    ({"data.val_split": "nope"}, r"^data.val_split: .*: no split 'nope'; splits are "),
])
def test_finetune_data_errors_name_their_key(labelled, tmp_path, no_compute, overrides, message):
  with pytest.raises(setup.ConfigError, match=message):
    finetune.run(_finetune_config(labelled, **overrides), str(tmp_path / "w"))


def test_finetune_from_an_empty_init_path(labelled, tmp_path, no_compute):
  config = _finetune_config(labelled, "checkpoint,tiny", **{"data.label_fraction": 1.0})
  with pytest.raises(setup.ConfigError, match=(
      r"^config key init.path is empty: set it to a pretraining run's workdir or an imported "
      r"checkpoint, or use configs/finetune.py:random$")):
    finetune.run(config, str(tmp_path / "w"))


@pytest.mark.parametrize("step_dir", ["", "checkpoints/12"])
def test_finetune_with_another_norm_than_the_pretraining_is_refused(labelled, tmp_path, no_compute,
                                                                    step_dir):
  """Features learnt on standardised bands would be fed x/255-scaled ones, silently."""
  pretrained = tmp_path / "pre"
  (pretrained / "checkpoints" / "12" / "state").mkdir(parents=True)
  (pretrained / "config.json").write_text('{"stage": "pretrain", "data": {"norm": "stats"}}')
  config = _finetune_config(labelled, "checkpoint,tiny", **{"data.label_fraction": 1.0,
                                                           "init.path": str(pretrained / step_dir)})
  with pytest.raises(setup.ConfigError, match=(
      r"^data.norm is 'reference', but .*/pre(/checkpoints/12)? was trained on inputs normalised "
      r"with 'stats'; set data.norm=stats so that its features see inputs like those they were "
      r"learnt on$")):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  # A workdir started before the check resumes (its config may not change, and the resumed
  # state replaces the init, which is not even read: it may have moved since).
  (tmp_path / "w" / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "w" / "config.json").write_text(json.dumps(config.to_dict()))
  shutil.rmtree(pretrained)
  with pytest.raises(AssertionError, match="before the model is initialised"):  # checks passed
    finetune.run(config, str(tmp_path / "w"))


def test_finetune_with_another_model_size_than_the_pretraining_names_the_key(labelled, tmp_path,
                                                                           no_compute):
  """A ',tiny' pretraining under the full-size fine-tuning config: 'width 0.25, this run has 1.0',
  not a BatchNorm bias of 16 against 64 channels."""
  pretrained = tmp_path / "pre"
  pretrained.mkdir()
  (pretrained / "config.json").write_text(
      '{"stage": "pretrain", "data": {"norm": "reference"}, "model": {"depth": 50, "width": 0.25}}')
  config = _finetune_config(labelled, "checkpoint", **{"data.label_fraction": 1.0,
                                                      "init.path": str(pretrained)})
  with pytest.raises(setup.ConfigError, match=(
      r"^init.path: .*/pre was pretrained with model.width 0.25, this run has 1.0; set "
      r"model.width=0.25 \(a ',tiny' pretraining needs the ',tiny' fine-tuning config\)$")):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def ignored(tmp_path_factory):
  """4 scenes whose scene_000 (in train, and the whole 1% list) and scene_001 (val) are labelled
  255, the ignore index, everywhere."""
  import rasterio  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("ignored")
  synthetic.write_corpus(root / "corpus", num_scenes=4, height=128, width=128, seed=3)
  for scene in ("scene_000", "scene_001"):
    with rasterio.open(root / "corpus" / "labels" / f"{scene}.tif", "r+") as f:
      f.write(f.read() * 0 + 255)
  lists = {"train": "scene_000\nscene_002\n", "val": "scene_001\n", "test": "scene_003\n",
           "r1": "scene_000\n"}
  for name, text in lists.items():
    (root / f"{name}.txt").write_text(text)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         split_lists={s: root / f"{s}.txt" for s in ("train", "val", "test")},
                         subset_lists={"0.01": root / "r1.txt"}, progress=False)


@pytest.mark.parametrize("fraction, message", [
    (0.01, r"data.split: the 4 tiles that data.label_fraction 0.01 keeps of split 'train' of .*/ds "
           r"has no labelled pixel \(every label is the ignore index 255\); fine-tuning would learn "
           r"nothing: check the conversion's --ignore-colour and --unknown-to-ignore, or raise "
           r"data.label_fraction"),
    (1.0, r"data.val_split: split 'val' of .*/ds has no labelled pixel \(every label is the ignore "
          r"index 255\); model selection needs labels"),
])
def test_finetune_on_tiles_without_a_labelled_pixel_is_refused(ignored, tmp_path, no_compute, fraction,
                                                               message):
  """It trained on a zero loss and kept a 'best' state, or failed after its first epoch."""
  config = _finetune_config(ignored, **{"data.label_fraction": fraction, "data.batch_size": 4})
  with pytest.raises(setup.ConfigError, match=f"^{message}$"):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("fraction, message", [
    (0.01, r"probe.split: the 4 tiles that probe.fraction 0.01 keeps of split 'train' of .*/ds has no "
           r"labelled pixel \(every label is the ignore index 255\); the probe would learn nothing "
           r"\(probe.enabled=False turns it off\)"),
    (1.0, r"probe.eval_split: split 'val' of .*/ds has no labelled pixel \(every label is the ignore "
          r"index 255\); the probe's scores would count nothing \(probe.enabled=False turns it off\)"),
])
def test_a_probe_on_tiles_without_a_labelled_pixel_is_refused(ignored, tmp_path, no_compute, fraction,
                                                              message):
  config = _config(ignored, **{"data.batch_size": 8})
  config.probe.enabled, config.probe.fraction, config.probe.eval_split = True, fraction, "val"
  with pytest.raises(setup.ConfigError, match=f"^{message}$"):
    pretrain.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_evaluating_a_split_without_a_labelled_pixel_is_refused(ignored, tmp_path):
  from glc_jax.stages import evaluate  # pylint: disable=import-outside-toplevel
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("eval_cfg", "configs/evaluate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.path, config.data.split, config.checkpoint = str(ignored), "val", str(tmp_path / "ft")
  with pytest.raises(setup.ConfigError, match=(
      r"^data.split: split 'val' of .*/ds has no labelled pixel \(every label is the ignore index "
      r"255\); there is nothing to score$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_finetune_batch_larger_than_the_labelled_subset_names_the_fraction(labelled, tmp_path, no_compute):
  """The 8-record train split holds 8 tiles, its stored 1% subset 1: it is the fraction that
  leaves too few records for a batch of 8, so the message must name data.label_fraction."""
  config = _finetune_config(labelled, **{"data.label_fraction": 0.01, "data.batch_size": 8})
  with pytest.raises(setup.ConfigError, match=(
      r"^data.batch_size 8 is larger than the 1 records that data.label_fraction 0.01 keeps of "
      r"split 'train' \(8 records\); raise data.label_fraction or lower data.batch_size$")):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_finetune_batch_larger_than_the_whole_split_names_the_split(labelled, tmp_path, no_compute):
  config = _finetune_config(labelled, **{"data.label_fraction": 1.0, "data.batch_size": 16})
  with pytest.raises(setup.ConfigError,
                     match=r"^data.batch_size 16 is larger than the 8 records of split 'train'$"):
    finetune.run(config, str(tmp_path / "w"))


def test_finetune_random_init_refuses_a_set_init_path(labelled, tmp_path, no_compute):
  """init.kind=random would otherwise train from scratch while the user believes the
  weights at init.path were loaded."""
  config = _finetune_config(labelled, **{"data.label_fraction": 1.0, "init.path": "runs/glcnet"})
  with pytest.raises(setup.ConfigError, match=(
      r"^config key init.path is 'runs/glcnet' but init.kind is 'random', which loads nothing; "
      r"clear init.path or use configs/finetune.py:checkpoint$")):
    finetune.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("content, message", [
    (None, r"jigsaw permutations .*perms.npy: cannot read a .npy array"),
    ([list(range(9))] * 2, r".*perms.npy holds 2 permutations but model.num_permutations = 1000; "
                           r"set them equal"),
])
def test_pretrain_jigsaw_permutation_file_errors_are_one_line(dataset, tmp_path, no_compute, content,
                                                              message):
  import numpy as np  # pylint: disable=import-outside-toplevel
  path = tmp_path / "perms.npy"
  if content is not None:
    np.save(path, np.array(content))
  config = _config(dataset, variant="jigsaw,tiny", **{"data.batch_size": 8})
  config.input.permutations = str(path)
  with pytest.raises(setup.ConfigError, match=f"^input.permutations: {message}"):
    pretrain.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_pretrain_jigsaw_generated_permutation_count_names_its_key(dataset, tmp_path, no_compute):
  config = _config(dataset, variant="jigsaw,tiny", **{"data.batch_size": 8})
  config.model.num_permutations = 400_000  # more than 9! = 362,880
  with pytest.raises(setup.ConfigError, match=r"^model.num_permutations: "):
    pretrain.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_the_reference_protocol_runs_on_its_own_split_layout(dataset, tmp_path, no_compute):
  """docs/reproducing.md's datasets have train and test only; the full-size config's probe is
  scored on 'val', so ',reference' leaves it off (the reference has none)."""
  config = _config(dataset, variant="glcnet,reference", **{"data.batch_size": 8})
  with pytest.raises(AssertionError, match="before the model is initialised"):  # all checks passed
    pretrain.run(config, str(tmp_path / "work"))


def test_a_warm_up_as_long_as_the_run_is_one_line(dataset, tmp_path, no_compute):
  config = _config(dataset, **{"data.batch_size": 8, "optimizer.warmup_epochs": 1.0})
  config.num_steps = 1  # one epoch of the schedule
  with pytest.raises(setup.ConfigError, match=(
      r"^config key optimizer.warmup_epochs is 1.0, 1 steps at 1 per epoch; the warm-up must be "
      r"shorter than the run \(steps: 1\)$")):
    pretrain.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_pretrain_batch_larger_than_the_split_names_the_split(dataset, tmp_path, no_compute):
  with pytest.raises(setup.ConfigError,
                     match=r"^data.batch_size 16 is larger than the 8 records of split 'train'$"):
    pretrain.run(_config(dataset, **{"data.batch_size": 16}), str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


# --- train.py: named choices checked up front, Ctrl-C and failures in one line -----------------

def _train_module():
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  import train  # pylint: disable=import-outside-toplevel
  return train


@pytest.mark.parametrize("key, value, message", [
    ("method", "foo", r"config key method is 'foo'; expected one of 'glcnet', .*, 'segmentation'"),
    ("model.dtype", "float16", r"config key model.dtype is 'float16'; expected one of 'auto', "
                               r"'float32', 'bfloat16'"),
    ("model.conv_impl", "foo", r"config key model.conv_impl is 'foo'; expected one of 'auto', "
                               r"'plain', 'cpu'"),
    ("model.remat", "foo", r"config key model.remat is 'foo'; expected one of '', 'none', "
                           r"'nothing_saveable', .*"),
    ("model.output_stride", 7, r"config key model.output_stride is 7; expected one of 8, 16"),
    ("model.depth", 20, r"config key model.depth is 20; expected one of 18, 34, 50, 101"),
    ("optimizer.name", "sgdd", r"config key optimizer.name is 'sgdd'; expected one of 'adam', "
                               r"'adamw', 'lars'"),
    ("optimizer.schedule", "linear", r"config key optimizer.schedule is 'linear'; expected one of "
                                     r"'cosine', 'exponential', 'constant'"),
    ("loss.temperature", -1.0, r"config key loss.temperature is -1.0; expected a number > 0 .*"),
    ("loss.temperature", 0.0, r"config key loss.temperature is 0.0; expected a number > 0 .*"),
    ("optimizer.lr", -1.0, r"config key optimizer.lr is -1.0; expected a number > 0 \(a negative "
                           r"one would climb the loss\)"),
    ("optimizer.warmup_epochs", -1.0, r"config key optimizer.warmup_epochs is -1.0; expected a "
                                      r"number >= 0 \(0 for no warm-up\)"),
    ("optimizer.grad_clip_norm", -1.0, r"config key optimizer.grad_clip_norm is -1.0; expected a "
                                       r"number >= 0 \(0 for no clipping; .*\)"),
    ("optimizer.weight_decay", -1e-5, r"config key optimizer.weight_decay is -1e-05; expected a "
                                      r"number >= 0 .*"),
    ("optimizer.b1", 1.5, r"config key optimizer.b1 is 1.5; expected a number in \(0, 1\) .*"),
    ("loss.weight", 2.0, r"config key loss.weight is 2.0; expected a number in \[0, 1\] .*"),
    ("optimizer.reference_batch", 0, r"config key optimizer.reference_batch is 0; expected a "
                                     r"number > 0 .*"),
    ("optimizer.end_lr", -1e-3, r"config key optimizer.end_lr is -0.001; expected a number >= 0 .*"),
    ("optimizer.lr", float("inf"), r"config key optimizer.lr is inf; expected a number > 0 .*"),
    ("model.bn_momentum", 1.5, r"config key model.bn_momentum is 1.5; expected a number in "
                               r"\[0, 1\] .*"),
])
def test_train_refuses_a_bad_named_value_before_anything(dataset, tmp_path, no_compute, key, value,
                                                          message):
  config = _config(dataset, **{"data.batch_size": 8})
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(setup.ConfigError, match=f"^{message}$"):
    _train_module().run_stage(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_train_checks_the_demo_stage_configs_under_their_key(tmp_path, monkeypatch):
  from glc_jax.stages import demo  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(demo, "_chain", lambda *a: pytest.fail("the demo started with a bad config"))
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("demo_cfg", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.finetune.model.dtype = "half"
  with pytest.raises(setup.ConfigError, match=r"^config key finetune.model.dtype is 'half'; "):
    _train_module().run_stage(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_train_py_removes_the_compilation_cache_of_a_workdir_it_made(dataset, tmp_path):
  """JAX makes <workdir>/jax_cache at its first compilation, before the recipe refuses the views."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  result = subprocess.run([sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny",
                           f"--workdir={tmp_path}/w", f"--config.data.path={dataset}",
                           "--config.data.batch_size=8", "--config.input.view_size=7"],
                          capture_output=True, text=True, timeout=120, env=env)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == ["error: input: patch_size 16 must be in 1..7"]
  assert not (tmp_path / "w").exists()


def test_an_interrupted_training_says_where_a_rerun_resumes(tmp_path):
  train = _train_module()
  work = tmp_path / "run"
  assert train.interrupted_message("pretrain", work) == (
      "pretrain: interrupted before its first checkpoint; run the same command again to start afresh")
  for step in (2, 10, 4):
    (work / "checkpoints" / str(step)).mkdir(parents=True)
  (work / "checkpoints" / "12.orbax-checkpoint-tmp").mkdir()  # a save the interrupt cut short
  assert train.interrupted_message("finetune", work) == (
      f"finetune: interrupted; {work} keeps its newest checkpoint, step 10; run the same command "
      "again to resume from it")


@pytest.mark.parametrize("during", ["corpus", "compile"])
def test_train_py_ctrl_c_is_one_line(tmp_path, during):
  """SIGINT to the process group, as a terminal's Ctrl-C, while the demo writes its corpus
  (no worker processes yet), or once pretraining has begun compiling (an interpreter torn
  down around XLA's compile threads could segfault)."""
  work = tmp_path / "demo"
  # A shell starts background jobs with SIGINT ignored, and children inherit that (train.py
  # then leaves it so); the user's terminal delivers it, so the run gets the default back.
  proc = subprocess.Popen([sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={work}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 120
    # The corpus is written into a hidden folder, renamed when complete.
    started = (lambda: any(work.glob(".synthetic.*/images"))) if during == "corpus" else (
        lambda: (work / "pretrain_glcnet").exists())
    while not started() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    if during == "compile":
      time.sleep(2.0)
    # One press, even one that lands in a garbage-collection callback.
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=90)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  lines = [line for line in stderr.replace("\r", "\n").splitlines()
           if line.strip() and "%|" not in line]  # the steps' progress bars
  assert proc.returncode == 130, stderr[-2000:]
  assert lines == [f"demo: interrupted; the steps it finished are kept in {work}; run the same "
                   "command again to go on from them"], stderr[-2000:]
  assert not (work / "run.lock").exists()


def test_after_ctrl_c_the_libraries_log_nothing(caplog):
  """Orbax logs the interrupt that cuts its save short, with a traceback; the run's one line is enough."""
  import logging  # pylint: disable=import-outside-toplevel

  from glc_jax import cli  # pylint: disable=import-outside-toplevel
  try:
    with pytest.raises(KeyboardInterrupt):
      cli.interrupt(signal.SIGINT, None)
    logging.getLogger("orbax").error("[wait_until_finished] Save Finalize thread (save_finalize) failed.")
    assert not caplog.records
  finally:
    logging.disable(logging.NOTSET)


def test_a_ctrl_c_in_a_destructor_still_stops_the_command():
  """Python ignores an exception raised in __del__ or a garbage-collection callback (JAX has
  one); a Ctrl-C landing there must still reach the command."""
  script = textwrap.dedent("""
      import os, signal, time
      from glc_jax import cli
      cli.catch_interrupts()

      class Collected:
        def __del__(self):
          os.kill(os.getpid(), signal.SIGINT)
          for _ in range(100_000):  # the handler runs here, inside __del__
            pass

      try:
        Collected()
        time.sleep(5)
        print("not interrupted")
      except KeyboardInterrupt:
        print("interrupted")
      """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert (done.stdout, done.stderr) == ("interrupted\n", "")


@pytest.mark.slow
def test_a_ctrl_c_exit_unlinks_the_data_workers_shared_memory(tmp_path):
  """The exit after a Ctrl-C skips the interpreter's teardown; batches still held (reference
  cycles hold some) would be left to the resource tracker, which warns about each at exit."""
  script = tmp_path / "held.py"
  script.write_text(textwrap.dedent("""
      import grain
      import numpy as np
      from glc_jax import cli
      from glc_jax.data import pipelines

      def tile(i):
        return np.full((64, 64, 4), i, np.float32)

      def train():
        it = pipelines.make_iterator(grain.MapDataset.range(64).map(tile).batch(4), num_workers=2)
        held = [next(it) for _ in range(3)]
        held.append(held)
        it.close()

      if __name__ == "__main__":
        train()
        cli.exit_with("interrupted", cli.INTERRUPTED)
      """))
  done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
  assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_a_second_ctrl_c_during_the_exit_changes_nothing():
  """After the one line, the exit frees the data workers' buffers; a press meanwhile (nothing
  seems to happen) must not add a traceback."""
  script = textwrap.dedent("""
      import os, signal, time
      from glc_jax import cli
      from glc_jax.data import pipelines

      def release_batches():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)

      pipelines.release_batches = release_batches
      cli.catch_interrupts()
      cli.exit_with("interrupted", cli.INTERRUPTED)
      """)
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert (done.returncode, done.stderr) == (130, "interrupted\n")


def test_grain_workers_leave_ctrl_c_to_the_parent():
  """A terminal's Ctrl-C reaches the workers too; each would print its own KeyboardInterrupt."""
  import multiprocessing  # pylint: disable=import-outside-toplevel

  import grain  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from glc_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  before = set(multiprocessing.active_children())
  iterator = pipelines.make_iterator(grain.MapDataset.source([{"x": np.arange(4)}] * 4), num_workers=1)
  try:
    assert next(iterator)["x"].tolist() == [0, 1, 2, 3]
    assert_ignore_sigint([p for p in multiprocessing.active_children() if p not in before])
  finally:
    iterator.close()


@pytest.fixture(scope="module")
def uint16_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("uint16")
  synthetic.write_corpus(root / "corpus", num_scenes=2, height=64, width=64, seed=2, dtype="uint16")
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, progress=False,
                         split_fractions={"train": 0.5, "val": 0.5})


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_reference_norm_of_8_bit_pixels_is_refused_for_other_dtypes(uint16_dataset, tmp_path, no_compute,
                                                                    stage):
  """x/255·3.2−1.6 on uint16 pixels gives inputs up to ~400 instead of ±1.6."""
  config = (_config(uint16_dataset) if stage == "pretrain" else
            _finetune_config(uint16_dataset, **{"data.label_fraction": 1.0}))
  with pytest.raises(setup.ConfigError, match=(
      r"^config key data.norm is 'reference', which scales 8-bit pixels \(x/255\), but this "
      r"dataset's images are uint16; set data.norm=stats \(each band's mean and std on the "
      r"training split\)$")):
    (pretrain if stage == "pretrain" else finetune).run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
  config.data.norm = "nonsense"
  with pytest.raises(setup.ConfigError,
                     match=r"^config key data.norm is 'nonsense'; expected one of 'reference', 'stats'$"):
    (pretrain if stage == "pretrain" else finetune).run(config, str(tmp_path / "w"))
