"""The benchmark matrix: its cells, where each lives, and the stage configs that run it.

A cell is one (init, label fraction, seed): fine-tuned from `init` (a
pretraining method, 'random' or 'imagenet') on that fraction of the training
labels, then evaluated. Pretraining runs are shared by the cells of a method
and seed. Layout under the benchmark workdir:

    pretrain/<method>/seed<k>/           a pretraining run
    finetune/<init>/f<fraction>/seed<k>/ a fine-tuning run
    eval/<init>/f<fraction>/seed<k>/     its evaluation (metrics.json = cell done)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
from typing import Any

import ml_collections

from glc_jax import files
from glc_jax.stages import run_dir, setup as stage_setup

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
BASELINE_INITS = ("random", "imagenet")


class BenchmarkConfigError(ValueError):
  """A benchmark config value that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Cell:
  init: str
  fraction: float
  seed: int

  @property
  def name(self) -> str:
    return f"{self.init}/f{self.fraction:g}/seed{self.seed}"

  @property
  def pretrained(self) -> bool:
    return self.init not in BASELINE_INITS


def pretrain_dir(work: pathlib.Path, method: str, seed: int) -> pathlib.Path:
  return work / "pretrain" / method / f"seed{seed}"


def finetune_dir(work: pathlib.Path, cell: Cell) -> pathlib.Path:
  return work / "finetune" / cell.name


def eval_dir(work: pathlib.Path, cell: Cell) -> pathlib.Path:
  return work / "eval" / cell.name


def is_done(work: pathlib.Path, cell: Cell) -> bool:
  return (eval_dir(work, cell) / "metrics.json").is_file()


def inits(config: ml_collections.ConfigDict) -> list[str]:
  """Row order of the table: the methods, then random, then imagenet."""
  rows = list(config.methods)
  if config.random_init:
    rows.append("random")
  if config.imagenet_path:
    rows.append("imagenet")
  return rows


def cells(config: ml_collections.ConfigDict) -> list[Cell]:
  """All cells, seed-major so that a partial run already covers every init once."""
  return [Cell(init, float(f), int(seed)) for seed in config.seeds for init in inits(config)
          for f in config.fractions]


def _config_module(name: str):
  """configs/<name>.py, loaded by path (configs/ is not a package)."""
  spec = importlib.util.spec_from_file_location(f"glc_jax_benchmark_configs_{name}",
                                                CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(name: str, arg: str | None) -> ml_collections.ConfigDict:
  """get_config(arg) of configs/<name>.py."""
  return _config_module(name).get_config(arg)


def check(config: ml_collections.ConfigDict) -> None:
  """One-line errors for matrix keys that cannot work."""
  known = _config_module("pretrain").METHODS
  unknown = [m for m in config.methods if m not in known]
  if unknown:
    raise BenchmarkConfigError(f"config key methods: unknown {unknown}; expected some of {known}")
  if not config.methods and not config.random_init and not config.imagenet_path:
    raise BenchmarkConfigError("config keys methods, random_init, imagenet_path: nothing to compare")
  bad = [f for f in config.fractions if not 0.0 < float(f) <= 1.0]
  if bad or not config.fractions:
    raise BenchmarkConfigError(f"config key fractions: {list(config.fractions)}; each must lie in (0, 1]")
  if not config.seeds or len(set(config.seeds)) != len(config.seeds):
    raise BenchmarkConfigError(f"config key seeds: {list(config.seeds)}; give distinct integers")
  if config.size not in ("tiny", "full"):
    raise BenchmarkConfigError(f"config key size is {config.size!r}; expected 'tiny' or 'full'")
  if config.imagenet_path and not pathlib.Path(config.imagenet_path).exists():
    raise BenchmarkConfigError(f"config key imagenet_path: {config.imagenet_path} does not exist")
  try:
    stage_setup.check_counts(config, {"finetune_steps": 0, "finetune_validate_steps": 0,
                                      "finetune_patience_steps": 0})
  except stage_setup.ConfigError as e:
    raise BenchmarkConfigError(str(e)) from None


def override(base: ml_collections.ConfigDict, overrides: Any, where: str) -> None:
  """Sets each (nested) key of `overrides` in `base`; a key `base` lacks is an error."""
  for key, value in dict(overrides).items():
    if key not in base:
      raise BenchmarkConfigError(f"config key {where}.{key}: the stage config has no key {key!r}")
    if isinstance(base[key], ml_collections.ConfigDict):
      override(base[key], value, f"{where}.{key}")
    else:
      base[key] = value


def pretrain_config(config, method: str, seed: int, data_path: str) -> ml_collections.ConfigDict:
  c = load_config("pretrain", f"{method},tiny" if config.size == "tiny" else method)
  override(c, config.pretrain, "pretrain")
  c.seed = seed
  c.data.path = data_path
  c.data.split = config.data.train_split
  c.probe.split = config.data.train_split
  c.probe.eval_split = config.data.val_split
  return c


def subset_steps_per_epoch(num_labelled: int, batch_size: int) -> int:
  return max(num_labelled // batch_size, 1)


def finetune_config(config, cell: Cell, work: pathlib.Path, data_path: str,
                    num_labelled: int) -> ml_collections.ConfigDict:
  """The fine-tuning config of a cell; `num_labelled` tiles are in its label subset.

  `finetune_steps`, `finetune_validate_steps` and `finetune_patience_steps` (when > 0)
  are counted in steps so that every label fraction gets about the same budget,
  validation interval and early-stopping window; they become whole epochs of the
  cell's subset (and the patience whole validations).
  """
  c = load_config("finetune", ("random" if cell.init == "random" else "checkpoint") +
                   (",tiny" if config.size == "tiny" else ""))
  override(c, config.finetune, "finetune")
  c.seed = cell.seed
  c.data.path = data_path
  c.data.split = config.data.train_split
  c.data.val_split = config.data.val_split
  c.data.label_fraction = cell.fraction
  if cell.init == "imagenet":
    c.init.path = config.imagenet_path
    c.init.transfer = config.imagenet_transfer
  elif cell.pretrained:
    c.init.path = str(pretrain_dir(work, cell.init, cell.seed))
  steps_per_epoch = subset_steps_per_epoch(num_labelled, c.data.batch_size)
  if config.finetune_steps:
    c.epochs = math.ceil(config.finetune_steps / steps_per_epoch)
  if config.finetune_validate_steps:
    c.validate_every_epochs = max(round(config.finetune_validate_steps / steps_per_epoch), 1)
  if config.finetune_patience_steps:
    c.early_stopping.patience = math.ceil(
        config.finetune_patience_steps / (steps_per_epoch * c.validate_every_epochs))
  return c


def evaluate_config(config, cell: Cell, work: pathlib.Path, data_path: str) -> ml_collections.ConfigDict:
  c = load_config("evaluate", None)
  override(c, config.evaluate, "evaluate")
  c.data.path = data_path
  c.data.split = config.data.test_split
  c.checkpoint = str(finetune_dir(work, cell))
  return c


# Keys that change what a finished cell means; the matrix keys (methods,
# fractions, seeds, ...) may grow between runs of the same workdir.
_MATRIX_KEYS = ("methods", "random_init", "imagenet_path", "fractions", "seeds", "compilation_cache")
# Keys added after workdirs may have been set up, with the value they had there.
_ADDED_KEYS = {"finetune_validate_steps": 0, "finetune_patience_steps": 0}
# Stage keys that change how a cell runs or reports, never its scores.
_HARMLESS_KEYS = frozenset({"evaluate.eval.batch_size", "evaluate.write_predictions",
                            *(f"{stage}.{key}" for stage in ("pretrain", "finetune")
                              for key in ("log_every", "checkpoint_every", "keep_checkpoints"))})


def _setup(config: ml_collections.ConfigDict) -> dict:
  return {k: v for k, v in json.loads(config.to_json()).items() if k not in _MATRIX_KEYS}


def _setup_record(work: pathlib.Path) -> pathlib.Path:
  return work / "benchmark_config.json"


def check_same_setup(config: ml_collections.ConfigDict, work: pathlib.Path) -> None:
  """A workdir whose finished cells ran with another setup is an error (record_setup keeps it)."""
  record = _setup_record(work)
  if not record.is_file():
    return
  changed = {k: v for k, v in run_dir.differences(
      run_dir.flatten({**_ADDED_KEYS, **json.loads(record.read_text())}),
      run_dir.flatten(_setup(config))).items() if k not in _HARMLESS_KEYS}
  if changed:
    listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changed.items())
    raise BenchmarkConfigError(
        f"{record}: this workdir was run with other settings: {listed}; finished cells would "
        "not be comparable. Use a new --workdir")


def record_setup(config: ml_collections.ConfigDict, work: pathlib.Path) -> None:
  """Records the setup once a cell has finished with it; until then a rerun may change it
  (a failed first attempt must not lock the workdir to settings that never produced a cell)."""
  record = _setup_record(work)
  if not record.is_file():
    files.write_text_atomic(record, json.dumps(_setup(config), indent=2, sort_keys=True) + "\n")
