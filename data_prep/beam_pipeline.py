"""The Beam path of `convert`: the same dataset as the local path, read and written on a runner.

Each element is one chunk of windows of one scene (the local path's unit of
work, at most 16 MiB of pixels), so a huge scene spreads over many workers.
Workers read chunks with `tiling.read_chunk`, as the local path's processes do.
TFDS's `BeamWriter` writes the records to ArrayRecord shards with shuffling
disabled: a record's key is its place in the local path's generation order
(split, scene, row-major windows), so record i of a split is the same tile on
both paths and the subsets in metadata.json select the same tiles. Per-band
statistics and class counts are merged across workers from histograms and
moments (`BandStatsAccumulator.merge`, exact for integer pixels; float32
moments to rounding, which depends on the merge order). The record counts of
each chunk come back to the launching process, which finishes the metadata as
the local path does.

The launching process keeps the local path's rules (see convert): it holds the
dataset's lock while the pipeline runs, and the pipeline writes into the hidden
`.NAME.incomplete-PID` folder, renamed into place only when complete. Workers
must therefore see that folder at the same path (docs/data_prep.md, Beam).
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import re
from pathlib import Path

from data_prep.beam_settings import INSTALL_HINT, BeamSettings
from data_prep.errors import DataPrepError

try:
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
except ImportError:
  raise DataPrepError(f"the Beam path needs apache-beam, which is not installed: {INSTALL_HINT}") from None

import numpy as np
from tensorflow_datasets.core import example_serializer, file_adapters, naming
from tensorflow_datasets.core import writer as tfds_writer
from tensorflow_datasets.core.utils import shard_utils
import tensorflow_datasets as tfds

from data_prep import tiling, writer
from data_prep.convert import SplitResult, SplitTally
from data_prep.stats import BandStatsAccumulator

_SUMMARY_FILE = "beam_summary.pickle"  # in the temporary folder, deleted once read
_STEP_NOTE = re.compile(r" \[while running '[^']*'\]")

log = logging.getLogger("data_prep")


class _SplitWriter(tfds_writer.BeamWriter):
  """TFDS's BeamWriter, except that a split whose tiles were all skipped ends up
  with no shards (and is then left out, as on the local path) instead of failing."""

  def _check_num_examples(self, num_examples: int) -> int:
    return num_examples


def _split_writer(folder: Path, split: str, features: tfds.features.FeaturesDict,
                  num_shards: int) -> _SplitWriter:
  """A writer of at most `num_shards` shards (fewer when key ranges hold no kept tile)."""
  template = naming.ShardedFileTemplate(data_dir=folder, dataset_name=writer.DATASET_NAME,
                                        split=split, filetype_suffix=writer.SHARD_SUFFIX)
  return _SplitWriter(
      serializer=example_serializer.ExampleSerializer(features.get_serialized_info()),
      filename_template=template, hash_salt=split, disable_shuffling=True,
      example_writer=tfds_writer.ExampleWriter(file_adapters.FileFormat.ARRAY_RECORD),
      shard_config=shard_utils.ShardConfig(num_shards=num_shards))


def _tile_bytes(job: tiling.TileJob) -> int:
  """Pixel bytes of the job's windows, image and label: a record's size, nearly."""
  pixels = int((job.windows[:, 2] * job.windows[:, 3]).sum())
  label_bytes = 1 if job.scene.label_path else 0
  return pixels * (job.scene.bands * np.dtype(job.scene.dtype).itemsize + label_bytes)


def _read(element, options: tiling.TileOptions):
  """(job index, split index, first key, job) → (job index, split index, first key, chunk)."""
  index, split, first_key, job = element
  return index, split, first_key, tiling.read_chunk(job, options)


def _keyed_records(element, features: tfds.features.FeaturesDict):
  """(key, encoded example) of each kept tile; keys leave gaps for skipped windows."""
  _, _, first_key, chunk = element
  for i, record in enumerate(chunk.records):
    yield first_key + i, features.encode_example(record)


def _chunk_counts(element) -> tuple:
  index, _, _, chunk = element
  return index, len(chunk.records), chunk.num_skipped, chunk.num_nonfinite, chunk.num_finite


def _chunk_stats(element) -> tuple:
  _, split, _, chunk = element
  return split, (chunk.stats, chunk.class_counts)


def _merge_stats(parts) -> tuple[BandStatsAccumulator, np.ndarray] | None:
  """Merges (band stats, class counts) pairs into new ones; Beam calls it on partial results too.

  None stands for no parts: a runner may merge accumulators that saw no element, and
  the band count of an empty merge is unknown.
  """
  parts = [part for part in parts if part is not None]
  if not parts:
    return None
  first = parts[0][0]
  stats, class_counts = BandStatsAccumulator(len(first.count), first.dtype), np.zeros(256, np.int64)
  for part_stats, part_counts in parts:
    stats.merge(part_stats)
    class_counts += part_counts
  return stats, class_counts


def _save_summary(counts: list, path: str, stats: list) -> None:
  with open(path, "wb") as f:
    pickle.dump({"counts": counts, "stats": dict(stats)}, f)


def _worker_error(error: Exception) -> DataPrepError:
  """One line for a failed pipeline: a worker's DataPrepError as the local path gives it."""
  text = _STEP_NOTE.sub("", str(error))
  if isinstance(error, DataPrepError):
    return DataPrepError(text)
  # Runners that run workers in other processes report the worker's traceback as text.
  for line in reversed(text.splitlines()):
    _, found, message = line.partition("DataPrepError: ")
    if found:
      return DataPrepError(message.strip())
  first = next((l for l in text.splitlines() if l.strip()), type(error).__name__)
  return DataPrepError(f"the Beam pipeline failed: {first.strip()}")


def write_splits(tmp: Path, features: tfds.features.FeaturesDict, split_names: list[str],
                 jobs: list[tiling.TileJob], job_split: list[str], options: tiling.TileOptions,
                 max_shard_bytes: int, settings: BeamSettings
                 ) -> tuple[dict[str, SplitResult], list[tfds.core.SplitInfo]]:
  """The Beam counterpart of convert's `_write_splits`: same arguments, same results."""
  elements, next_key, split_bytes = [], collections.Counter(), collections.Counter()
  for index, (job, split) in enumerate(zip(jobs, job_split)):
    elements.append((index, split_names.index(split), next_key[split], job))
    next_key[split] += len(job.windows)
    split_bytes[split] += _tile_bytes(job)
  # TFDS sizes shards by its own defaults (ShardConfig's sizes are read from the
  # class, not the instance), so the count is fixed here from the pixels to read;
  # tiles are spread over shards by key range, and skipped tiles make shards smaller.
  writers = [_split_writer(tmp, name, features, max(1, -(-split_bytes[name] // max_shard_bytes)))
             for name in split_names]
  try:
    with beam.Pipeline(options=PipelineOptions(settings.pipeline_flags())) as pipeline:
      chunks = (pipeline
                | "Jobs" >> beam.Create(elements)  # reshuffled: chunks spread over workers
                | "Read" >> beam.Map(_read, options))
      by_split = chunks | "By split" >> beam.Partition(lambda e, n: e[1], len(split_names))
      for name, split_chunks, split_writer in zip(split_names, by_split, writers):
        _ = (split_chunks
             | f"Records {name}" >> beam.FlatMap(_keyed_records, features)
             | f"Write {name}" >> beam.ptransform_fn(split_writer.write_from_pcollection)())
      stats = (chunks
               | "Stats" >> beam.Map(_chunk_stats)
               | "Merge stats" >> beam.CombinePerKey(_merge_stats)
               | "Collect stats" >> beam.combiners.ToList())
      _ = (chunks
           | "Counts" >> beam.Map(_chunk_counts)
           | "Collect counts" >> beam.combiners.ToList()
           | "Save summary" >> beam.Map(_save_summary, os.fspath(tmp / _SUMMARY_FILE),
                                        stats=beam.pvalue.AsSingleton(stats)))
  except Exception as e:  # whatever the runner raises, the user gets one line
    raise _worker_error(e) from None
  with open(tmp / _SUMMARY_FILE, "rb") as f:
    summary = pickle.load(f)
  (tmp / _SUMMARY_FILE).unlink()

  tally = SplitTally(split_names, jobs[0].scene)
  for index, num_records, num_skipped, num_nonfinite, num_finite in sorted(summary["counts"]):
    tally.add(job_split[index], jobs[index].scene, num_records, num_skipped, num_finite, num_nonfinite)
  results = tally.finish()
  for i, (stats, class_counts) in summary["stats"].items():
    results[split_names[i]].stats, results[split_names[i]].class_counts = stats, class_counts

  split_infos = []
  for name, split_writer in zip(split_names, writers):
    shard_lengths, num_bytes = split_writer.finalize()
    if results[name].num_records == 0:
      log.warning("split %r has no tiles; left out", name)
      continue
    split_infos.append(tfds.core.SplitInfo(name=name, shard_lengths=shard_lengths,
                                           num_bytes=num_bytes))
  return results, split_infos
