"""Checks and set-up every stage does before any compute."""
from __future__ import annotations

import json
import pathlib

import jax
import ml_collections

from glc_jax import parallel
from glc_jax.data.source import DatasetInfo, TileSource, open_dataset


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def open_split(path: str, split: str, subset_fraction: float | None = None,
               key: str = "data.path") -> tuple[TileSource, DatasetInfo]:
  if not path:
    raise ConfigError(f"config key {key} is empty: set it to a dataset made by `python -m data_prep`")
  try:
    return open_dataset(path, split, subset_fraction)
  except (FileNotFoundError, KeyError, ValueError) as e:
    raise ConfigError(f"{key}: {str(e).strip(chr(34) + chr(39))}") from None


def checked_batch(global_batch: int, mesh: jax.sharding.Mesh, num_records: int,
                  key: str = "data.batch_size") -> int:
  try:
    parallel.check_global_batch(global_batch, mesh, what=f"{key}")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if num_records < global_batch:
    raise ConfigError(f"{key} {global_batch} is larger than the {num_records} records of the split")
  return global_batch


def example_shapes(dataset) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of a MapDataset of batches (computes batch 0)."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in dataset[0].items()}


def write_run_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config a run was started with, next to its checkpoints."""
  if jax.process_index() == 0:
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str) + "\n")
