"""Checks and set-up every stage does before any compute."""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from glc_jax import methods, optim, parallel
from glc_jax.data import augment
from glc_jax.data.source import DatasetInfo, TileSource, open_dataset
from glc_jax.models import compute, resnet


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def open_split(path: str, split: str, subset_fraction: float | None = None,
               key: str = "data.path", split_key: str = "data.split",
               fraction_key: str = "data.label_fraction") -> tuple[TileSource, DatasetInfo]:
  """The split (or its labelled subset); a bad value is a ConfigError naming its config key."""
  if not path:
    raise ConfigError(f"config key {key} is empty: set it to a dataset made by `python -m data_prep`")
  try:
    source, info = open_dataset(path, split)
  except FileNotFoundError as e:
    raise ConfigError(f"{key}: {e}") from None
  except KeyError as e:
    raise ConfigError(f"{split_key}: {e.args[0]}") from None
  except ValueError as e:
    raise ConfigError(f"{key}: {e}") from None
  if subset_fraction is None:
    return source, info
  try:
    return open_dataset(path, split, subset_fraction)
  except ValueError as e:
    raise ConfigError(f"{fraction_key}: {e}") from None


def check_labelled_pixels(source: TileSource, info: DatasetInfo, key: str, consequence: str,
                          fraction_key: str = "data.label_fraction") -> None:
  """One-line ConfigError when no pixel of `source` carries a label (each one is the ignore
  index: a wrong --ignore-colour, or a subset of nodata tiles). Training would run on a zero
  loss, and model selection and scores would have nothing to count. A whole split is read from
  its metadata; a subset is scanned up to its first labelled pixel."""
  if info.subset_fraction is None and info.class_pixel_counts is not None:
    labelled = int(np.sum(info.class_pixel_counts)) > 0
  else:
    labelled = any(np.any(source[i]["label"] != info.ignore_index) for i in range(len(source)))
  if not labelled:
    kept = ("" if info.subset_fraction is None else
            f"the {len(source)} tiles that {fraction_key} {info.subset_fraction:g} keeps of ")
    raise ConfigError(f"{key}: {kept}split {info.split!r} of {info.path} has no labelled pixel "
                      f"(every label is the ignore index {info.ignore_index}); {consequence}")


# Keys whose value is one of a fixed set, each set taken from the module that reads the key
# (where a bad value would otherwise surface as a traceback, some only once the model is traced).
CHOICES = {
    "method": methods.METHOD_NAMES,
    "model.depth": tuple(resnet.STAGE_BLOCKS),
    "model.output_stride": tuple(sorted(resnet.STRIDES_DILATIONS)),
    "model.stem_init": resnet.STEM_INITS,
    "model.dtype": ("auto", *compute.DTYPES),
    "model.conv_impl": ("auto", *compute.CONV_IMPLS),
    "model.remat": (*compute.NO_REMAT, *compute.REMAT_POLICIES),
    **{f"optimizer.{key}": allowed for key, allowed in optim.CHOICES.items()},
}
_ABSENT = object()


def _lookup(config: ml_collections.ConfigDict, key: str):
  value = config
  for part in key.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return _ABSENT
    value = value[part]
  return value


# Numeric keys whose value outside a range would train on silently, and wrongly:
# key → (lowest, highest, whether each end is allowed, why).
_NUMBERS = {
    "loss.temperature": (0, None, False, "the softmax temperature of the contrastive loss"),
    "loss.weight": (0, 1, True, "the global loss's share; the local loss gets the rest"),
    "optimizer.lr": (0, None, False, "a negative one would climb the loss"),
    "optimizer.warmup_epochs": (0, None, True, "0 for no warm-up"),
    "optimizer.weight_decay": (0, None, True, "a negative one grows the weights"),
    "optimizer.grad_clip_norm": (0, None, True, "0 for no clipping; a negative one flips every "
                                 "gradient"),
    "optimizer.decay_rate": (0, 1, True, "the exponential schedule's factor per epoch"),
    "optimizer.b1": (0, 1, False, "Adam's moment decay"),
    "optimizer.b2": (0, 1, False, "Adam's moment decay"),
    "optimizer.eps": (0, None, False, "Adam's denominator floor"),
    "optimizer.momentum": (0, 1, False, "LARS's momentum"),
    "optimizer.end_lr": (0, None, True, "the cosine's last lr; a negative one climbs the loss"),
    "optimizer.reference_batch": (0, None, False, "the batch that optimizer.lr is given for"),
    "loss.momentum": (0, 1, True, "MoCo's key-encoder average"),
    "model.bn_momentum": (0, 1, True, "the batch statistics' share of each BatchNorm update"),
}


def _in_range(value, low, high, ends: bool) -> bool:
  if not math.isfinite(value):
    return False
  above = value >= low if ends else value > low
  below = high is None or (value <= high if ends else value < high)
  return above and below


def _range_text(low, high, ends: bool) -> str:
  if high is None:
    return f"a number {'>=' if ends else '>'} {low}"
  return f"a number in {'[' if ends else '('}{low}, {high}{']' if ends else ')'}"


def check_choices(config: ml_collections.ConfigDict, prefix: str = "") -> None:
  """One-line ConfigError for a value outside CHOICES, or a number outside its bound
  (_NUMBERS).

  Keys the config lacks are not checked. The stage configs of a chain (the
  demo's pretrain, finetune and evaluate: sub-configs with their own `stage`)
  are checked under their key, e.g. pretrain.model.dtype.
  """
  for key, allowed in CHOICES.items():
    value = _lookup(config, key)
    if value is not _ABSENT and (isinstance(value, bool) or value not in allowed):
      raise ConfigError(f"config key {prefix}{key} is {value!r}; expected one of "
                        f"{', '.join(map(repr, allowed))}")
  for key, (low, high, ends, why) in _NUMBERS.items():
    value = _lookup(config, key)
    if value is not _ABSENT and (isinstance(value, bool) or not isinstance(value, (int, float))
                                 or not _in_range(value, low, high, ends)):
      raise ConfigError(f"config key {prefix}{key} is {value!r}; expected "
                        f"{_range_text(low, high, ends)} ({why})")
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and "stage" in value:
      check_choices(value, f"{prefix}{key}.")


def check_norm(norm: str, info: DatasetInfo, key: str = "data.norm") -> None:
  """One-line ConfigError for an unknown normalisation, or 'reference' (x/255·3.2−1.6, which
  assumes 8-bit pixels) on a dataset of another dtype, where it would silently feed the
  model near-constant (float reflectance) or unbounded (uint16) inputs."""
  if norm not in augment.NORM_MODES:
    raise ConfigError(f"config key {key} is {norm!r}; expected one of "
                      f"{', '.join(map(repr, augment.NORM_MODES))}")
  if norm == "reference" and info.dtype != "uint8":
    raise ConfigError(f"config key {key} is 'reference', which scales 8-bit pixels (x/255), but "
                      f"this dataset's images are {info.dtype}; set {key}=stats (each band's mean "
                      "and std on the training split)")


def check_counts(config: ml_collections.ConfigDict, minimums: dict[str, int]) -> None:
  """One-line error for an integer key (dotted path) below its minimum, e.g. epochs=0."""
  for key, least in minimums.items():
    value = config
    for part in key.split("."):
      value = value[part]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ConfigError(f"config key {key} is {value!r}; expected an integer >= {least}")


def checked_batch(global_batch: int, mesh: jax.sharding.Mesh, num_records: int,
                  key: str = "data.batch_size", info: DatasetInfo | None = None,
                  fraction_key: str = "data.label_fraction") -> int:
  """`global_batch`, checked against the devices and the `num_records` it draws from.

  info: the opened split (open_split); given, a batch too large for its labelled
  subset names `fraction_key`, since raising the fraction is as much a fix as a
  smaller batch.
  """
  try:
    parallel.check_global_batch(global_batch, mesh, what=f"{key}")
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if num_records >= global_batch:
    return global_batch
  if info is None:
    raise ConfigError(f"{key} {global_batch} is larger than the {num_records} records of the split")
  split_records = info.splits[info.split]
  if info.subset_fraction is not None and num_records < split_records:
    raise ConfigError(f"{key} {global_batch} is larger than the {num_records} records that "
                      f"{fraction_key} {info.subset_fraction:g} keeps of split {info.split!r} "
                      f"({split_records} records); raise {fraction_key} or lower {key}")
  raise ConfigError(f"{key} {global_batch} is larger than the {num_records} records of split {info.split!r}")


def example_shapes(dataset) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of one batch of a MapDataset of batches (computes batch 0).

  The first batch is where an input recipe meets the data, so a recipe's
  complaint about it (views larger than the tiles, say) is a config error.
  """
  try:
    batch = dataset[0]
  except ValueError as e:
    raise ConfigError(f"input: {e}") from None
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
