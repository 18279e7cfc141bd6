"""Writing records as a TFDS dataset in ArrayRecord files, without TensorFlow.

Shards are written in generation order by our own ArrayRecord writers (TFDS's
own writer would hold an unshuffled split in memory to sort it); TFDS then
receives the finished shards through `tfds.folder_dataset.write_metadata`,
which writes dataset_info.json, features.json and metadata.json.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter

DATASET_NAME = "geotiff_tiles"
DATASET_VERSION = "1.0.0"
SHARD_SUFFIX = "array_record"


@contextlib.contextmanager
def _array_record_errors(path: Path):
  """ArrayRecord reports I/O failures (e.g. a full disk) as RuntimeError; make them OSError."""
  try:
    yield
  except RuntimeError as e:
    reason = str(e).split(";")[0].strip() or "ArrayRecord write failed"
    raise OSError(errno.EIO, reason, os.fspath(path)) from None


def tile_features(tile: int, bands: int, dtype: str, labelled: bool) -> tfds.features.FeaturesDict:
  """The record contract: image, optional label, and provenance of each tile.

  Arrays are stored as raw bytes: TFDS's default tf.train.Example encoding would
  widen pixels to int64 (slow, 8x larger) and narrow float64 transforms to float32.
  """
  raw = tfds.features.Encoding.BYTES
  features = {
      "image": tfds.features.Tensor(shape=(tile, tile, bands), dtype=np.dtype(dtype), encoding=raw),
      "scene_id": tfds.features.Text(),
      "window": tfds.features.Tensor(shape=(4,), dtype=np.int64, encoding=raw),
      "transform": tfds.features.Tensor(shape=(6,), dtype=np.float64, encoding=raw),
      "crs": tfds.features.Text(),
  }
  if labelled:
    features["label"] = tfds.features.Tensor(shape=(tile, tile), dtype=np.uint8, encoding=raw)
  return tfds.features.FeaturesDict(features)


class SplitWriter:
  """Appends serialised records of one split to shards of at most `max_shard_bytes`."""

  def __init__(self, data_dir: Path, split: str, features: tfds.features.FeaturesDict,
               max_shard_bytes: int = 256 << 20):
    self._data_dir = Path(data_dir)
    self._split = split
    self._features = features
    self._max_shard_bytes = max_shard_bytes
    self._writer = None
    self._paths: list[Path] = []
    self.shard_lengths: list[int] = []
    self._shard_bytes = 0
    self.num_bytes = 0

  def write(self, record: dict) -> None:
    data = self._features.serialize_example(record)
    if self._writer is None or self._shard_bytes + len(data) > self._max_shard_bytes:
      self._roll()
    with _array_record_errors(self._paths[-1]):
      self._writer.write(data)
    self.shard_lengths[-1] += 1
    self._shard_bytes += len(data)
    self.num_bytes += len(data)

  def _roll(self) -> None:
    self._close_shard()
    path = self._data_dir / f"{self._split}.partial-{len(self._paths)}"
    # group_size:1 makes every record individually addressable, as TFDS does.
    with _array_record_errors(path):
      self._writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
    self._paths.append(path)
    self.shard_lengths.append(0)
    self._shard_bytes = 0

  def _close_shard(self) -> None:
    if self._writer is not None:
      writer, self._writer = self._writer, None
      with _array_record_errors(self._paths[-1]):
        writer.close()

  def close(self) -> tfds.core.SplitInfo:
    """Closes the last shard and gives shards their final TFDS names."""
    self._close_shard()
    total = len(self._paths)
    for i, path in enumerate(self._paths):
      path.rename(self._data_dir / (f"{DATASET_NAME}-{self._split}.{SHARD_SUFFIX}-"
                                     f"{i:05d}-of-{total:05d}"))
    return tfds.core.SplitInfo(name=self._split, shard_lengths=list(self.shard_lengths),
                               num_bytes=self.num_bytes)


def write_dataset_info(data_dir: Path, features: tfds.features.FeaturesDict,
                       split_infos: list[tfds.core.SplitInfo], metadata: dict,
                       description: str) -> None:
  """Writes the TFDS metadata files next to the shards (no read-back check: that needs TF)."""
  tfds.folder_dataset.write_metadata(
      data_dir=data_dir, features=features, split_infos=split_infos,
      version=DATASET_VERSION, check_data=False, description=description,
      metadata=tfds.core.MetadataDict(metadata))
