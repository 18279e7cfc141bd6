"""Stages refuse bad configs before any compute, with one-line messages naming the key."""
import subprocess
import sys

import pytest

from data_prep import convert, synthetic
from glc_jax.stages import finetune, pretrain, setup


def _config(path, **overrides):
  import importlib.util
  spec = importlib.util.spec_from_file_location("pretrain_cfg", "configs/pretrain.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("glcnet,tiny")
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


def test_train_py_unknown_key_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny",
                           f"--workdir={tmp_path}", "--config.data.nope=1"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      "error: unknown config key 'data.nope' (from --config.data.nope); see the config file for valid keys")


@pytest.mark.parametrize("entry", [["train.py"], ["-m", "glc_jax.benchmark"]])
def test_missing_config_file_is_one_line(entry, tmp_path):
  result = subprocess.run([sys.executable, *entry, "--config=configs/nothere.py", f"--workdir={tmp_path}/w"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "error: --config: [Errno 2] No such file or directory: 'configs/nothere.py'"]
  assert not (tmp_path / "w").exists()
