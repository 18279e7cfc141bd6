"""Reading datasets written by `python -m data_prep`: random access by record index.

    source, info = open_dataset("/data/potsdam_tiles", "train", subset_fraction=0.01)
    record = source[0]   # {"image": (T, T, C), "label": (T, T) uint8, provenance…}
    grain.MapDataset.source(source)   # any Grain map-style pipeline

Records (the team's record contract):
  image: (tile, tile, bands) uint8 | uint16 | float32, as in the source scenes;
  label: (tile, tile) uint8 class index, 255 = ignore (labelled datasets only);
  scene_id: str; window: (4,) int64 (row, col, height, width) in the scene;
  transform: (6,) float64 affine a..f of the tile (rasterio.Affine order);
  crs: str ("EPSG:n" or WKT; "" when the scene had none).
Needs tensorflow_datasets and array_record, not TensorFlow.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class BandStats:
  """Per-band pixel statistics of one split (valid, finite pixels of kept tiles).

  All arrays are (bands,) float64; `std` is the population std. `percentiles`
  maps q (e.g. 1.0, 99.0) to (bands,) values: exact for integer images, the
  value truncated to 8 significant bits for float32 images.
  """
  mean: np.ndarray
  std: np.ndarray
  min: np.ndarray
  max: np.ndarray
  percentiles: dict[float, np.ndarray]
  pixel_count: np.ndarray  # (bands,) int64


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a pipeline needs to know about an opened split.

  Attributes:
    path: the dataset folder.
    split: the opened split; `splits` maps every split to its record count.
    num_records: records in the opened split (after the subset, if any).
    subset_fraction: the labelled subset opened, None for the whole split.
    tile_size, num_bands, dtype: image shape (tile, tile, bands) and numpy dtype name.
    labelled: whether records carry "label".
    class_names, class_colours: (C,) names and (C, 3) uint8 RGB display colours.
    class_pixel_counts: (C,) int64 label pixels per class in the whole opened split.
    band_stats: statistics of the opened split; `split_band_stats` of every split
      (normalise with the training split's, not the evaluated one's).
    ignore_index: label value to ignore (255).
    metadata: the raw metadata.json dict (also tfds.builder_from_directory(path).info.metadata).
  """
  path: Path
  split: str
  splits: dict[str, int]
  num_records: int
  subset_fraction: float | None
  tile_size: int
  num_bands: int
  dtype: str
  labelled: bool
  class_names: tuple[str, ...]
  class_colours: np.ndarray
  class_pixel_counts: np.ndarray | None
  band_stats: BandStats
  split_band_stats: dict[str, BandStats]
  ignore_index: int
  metadata: dict = dataclasses.field(repr=False)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


class TileSource:
  """Random-access sequence of record dicts over one split (or one subset of it).

  Grain-compatible: `len`, `source[i]` and `source.__getitems__(indices)`;
  picklable, so Grain worker processes can use it.
  """

  def __init__(self, data_source, indices: np.ndarray | None):
    self._data_source = data_source
    self._indices = indices

  @property
  def record_indices(self) -> np.ndarray:
    """(len,) int64 index of each item in the full split (identity without a subset)."""
    if self._indices is None:
      return np.arange(len(self._data_source), dtype=np.int64)
    return self._indices

  def __len__(self) -> int:
    return len(self._data_source) if self._indices is None else len(self._indices)

  def _split_index(self, index: int) -> int:
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f"record {index} out of range for {n} records")
    index %= n
    return index if self._indices is None else int(self._indices[index])

  def __getitem__(self, index: int) -> dict:
    return _to_record(self._data_source[self._split_index(int(index))])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    keys = [self._split_index(int(i)) for i in indices]
    return [_to_record(r) for r in self._data_source.__getitems__(keys)]

  def __repr__(self) -> str:
    return f"TileSource({len(self)} records)"


def _to_record(raw: dict) -> dict:
  record = dict(raw)
  for key in ("scene_id", "crs"):
    value = record[key]
    record[key] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
  return record


def _band_stats(summary: dict) -> BandStats:
  def arr(values):
    return np.array([np.nan if v is None else v for v in values], np.float64)
  return BandStats(
      mean=arr(summary["mean"]), std=arr(summary["std"]), min=arr(summary["min"]),
      max=arr(summary["max"]),
      percentiles={float(q): arr(v) for q, v in summary["percentiles"].items()},
      pixel_count=np.array(summary["pixel_count"], np.int64))


def subset_indices(metadata: dict, split: str, fraction: float) -> np.ndarray:
  """Sorted (n,) int64 record indices of the split's labelled subset of `fraction`.

  Subsets are prefixes of one seeded permutation stored at conversion, so the
  subset for a smaller fraction is contained in every larger one; except a
  fraction given a list at conversion (data_prep --subset-list), which is the
  records of the images that list names.
  """
  entry = metadata["splits"][split]
  listed = entry.get("subset_lists", {}).get(f"{float(fraction):g}")
  if listed is not None:
    return np.asarray(listed, np.int64)
  sizes = {float(f): n for f, n in entry["subset_sizes"].items()}
  if float(fraction) not in sizes:
    raise ValueError(f"subset fraction {fraction} not stored for split {split!r}; "
                     f"available: {sorted(sizes)}")
  order = np.asarray(entry["subset_order"], np.int64)
  return np.sort(order[:sizes[float(fraction)]])


def is_dataset(path: str | Path) -> bool:
  """Whether `path` holds a finished data_prep dataset (its TFDS metadata files)."""
  return (Path(path) / "dataset_info.json").is_file() and (Path(path) / "metadata.json").is_file()


# What a run reads from a dataset, named so that keys a later data_prep adds (as it added
# scene_shapes) leave the digest of an unchanged dataset as it was.
_CONTENT_KEYS = ("tile_size", "stride", "num_bands", "dtype", "labelled", "ignore_index",
                 "class_names", "class_colours")
_SPLIT_CONTENT_KEYS = ("num_records", "scene_ids", "band_stats", "class_pixel_counts",
                       "subset_sizes", "subset_order", "subset_lists")


def content_id(metadata: dict) -> str:
  """A digest of what a dataset holds (tile settings, classes, and per split its scenes,
  record counts, statistics and labelled subsets: _CONTENT_KEYS), not of how it was made: an
  identical rebuild from touched or moved inputs keeps it, other tiles or scenes change it.
  Floats are rounded to 6 significant digits, as accumulation order (worker count) moves
  their last bits."""

  def rounded(value):
    if isinstance(value, float):
      return float(f"{value:.6g}")
    if isinstance(value, dict):
      return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
      return [rounded(v) for v in value]
    return value

  held = {k: metadata.get(k) for k in _CONTENT_KEYS}
  held["splits"] = {name: {k: entry.get(k) for k in _SPLIT_CONTENT_KEYS}
                    for name, entry in metadata["splits"].items()}
  text = json.dumps(rounded(held), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def open_dataset(path: str | Path, split: str = "train",
                 subset_fraction: float | None = None) -> tuple[TileSource, DatasetInfo]:
  """Opens one split of a data_prep dataset.

  Args:
    path: the dataset folder given to `data_prep --out`.
    split: split name (e.g. "train", "val"; see `info.splits`).
    subset_fraction: one of the stored labelled-subset fractions (default
      0.01, 0.05, 0.1, 0.25, 0.5, 1.0); None opens the whole split.
  Returns:
    (source, info): a TileSource and the DatasetInfo of that split.
  Raises:
    FileNotFoundError: `path` holds no finished dataset.
    KeyError / ValueError: unknown split or subset fraction.
  """
  import tensorflow_datasets as tfds  # heavy import, only where datasets are opened

  path = Path(path)
  if not is_dataset(path):
    raise FileNotFoundError(f"{path}: no finished data_prep dataset (dataset_info.json/metadata.json missing)")
  builder = tfds.builder_from_directory(str(path))
  metadata = dict(builder.info.metadata)
  splits = {name: entry["num_records"] for name, entry in metadata["splits"].items()}
  if split not in splits:
    raise KeyError(f"{path}: no split {split!r}; splits are {sorted(splits)}")
  indices = None if subset_fraction is None else subset_indices(metadata, split, subset_fraction)
  source = TileSource(builder.as_data_source(split), indices)
  entry = metadata["splits"][split]
  counts = entry.get("class_pixel_counts")
  info = DatasetInfo(
      path=path, split=split, splits=splits, num_records=len(source), subset_fraction=subset_fraction,
      tile_size=metadata["tile_size"], num_bands=metadata["num_bands"], dtype=metadata["dtype"],
      labelled=metadata["labelled"], class_names=tuple(metadata["class_names"]),
      class_colours=np.array(metadata["class_colours"], np.uint8).reshape(-1, 3),
      class_pixel_counts=None if counts is None else np.array(counts, np.int64),
      band_stats=_band_stats(entry["band_stats"]),
      split_band_stats={name: _band_stats(e["band_stats"]) for name, e in metadata["splits"].items()},
      ignore_index=metadata["ignore_index"], metadata=metadata)
  return source, info
