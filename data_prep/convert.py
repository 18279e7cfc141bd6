"""`convert`: a GeoTIFF corpus → a TFDS ArrayRecord dataset (the Python API of data_prep).

The dataset is built in a hidden sibling folder `.NAME.incomplete-PID` and renamed
to its final path only when complete, so a reader never sees a partial dataset; a
killed run leaves only that folder, which the next run removes (see output_folder).
"""
from __future__ import annotations

import collections
import colorsys
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import tqdm

from data_prep import class_maps, output_folder, parent_death, scenes as scenes_lib
from data_prep import splits as splits_lib, tiling, writer
from data_prep.beam_settings import BeamSettings
from data_prep.errors import DataPrepError
from data_prep.stats import PERCENTILES, BandStatsAccumulator

FORMAT_VERSION = 1
_CHUNK_BYTES = 16 << 20  # pixels per worker task; bounds memory in flight

log = logging.getLogger("data_prep")


def _fingerprint(settings: dict, files: Sequence[Path]) -> str:
  """Hash of the settings and of every input file's path, size and mtime."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
  for f in files:
    try:
      st = f.stat()
    except OSError as e:
      raise DataPrepError(f"{f}: cannot read ({e.strerror})") from None
    h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def read_prep_metadata(path: Path) -> dict | None:
  """The data_prep metadata of a finished dataset at `path`, or None if there is none."""
  try:
    with open(Path(path) / "metadata.json") as f:
      metadata = json.load(f)
    (Path(path) / "dataset_info.json").stat()
  except (OSError, ValueError):
    return None
  return metadata if metadata.get("format_version") == FORMAT_VERSION else None


def _chunk_jobs(scene: scenes_lib.Scene, windows: np.ndarray, tile: int) -> list[tiling.TileJob]:
  tile_bytes = tile * tile * scene.bands * np.dtype(scene.dtype).itemsize
  per_chunk = max(1, _CHUNK_BYTES // tile_bytes)
  return [tiling.TileJob(scene, windows[i:i + per_chunk]) for i in range(0, len(windows), per_chunk)]


def _reader_init(parent: int) -> None:
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent_death.exit_with_parent(parent)


@contextlib.contextmanager
def _sigint_ignored():
  """SIGINT ignored while worker processes start, so that they start ignoring it (a spawned
  interpreter keeps an ignored SIGINT): a terminal's Ctrl-C reaches the whole process group,
  and only the parent should act on it, in one line, not each worker with a traceback."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)


def _run_jobs(jobs: Sequence[tiling.TileJob], options: tiling.TileOptions,
              workers: int) -> Iterator[tiling.TileChunk]:
  """Chunks in job order; with workers > 1 read ahead by at most 2·workers jobs."""
  if workers <= 1:
    for job in jobs:
      yield tiling.read_chunk(job, options)
    return
  # Forking a process that has JAX loaded (threads) can deadlock, so spawn then;
  # otherwise fork, which also works from scripts without a __main__ guard.
  method = "spawn" if "jax" in sys.modules else "fork"
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context(method),
      initializer=_reader_init, initargs=(os.getpid(),))
  try:
    pending = collections.deque()
    job_iter = iter(jobs)
    with _sigint_ignored():  # the first submissions start the workers
      for job in itertools.islice(job_iter, 2 * workers):
        pending.append(pool.submit(tiling.read_chunk, job, options))
    while pending:
      try:
        chunk = pending.popleft().result()
      except concurrent.futures.process.BrokenProcessPool:
        raise DataPrepError("a data_prep worker process died (out of memory?); "
                            "try fewer --workers") from None
      job = next(job_iter, None)
      if job is not None:
        pending.append(pool.submit(tiling.read_chunk, job, options))
      yield chunk
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
  """Distinct display colours (evenly spaced hues) for index labels without a map."""
  return tuple(tuple(int(round(255 * v)) for v in colorsys.hsv_to_rgb(i / max(num_classes, 1), 0.8, 0.95))
               for i in range(num_classes))


@dataclasses.dataclass
class SplitResult:
  """What one split's chunks gave: the counts that metadata.json reports, and the
  band statistics and class counts (merged by the path that wrote the split)."""
  num_records: int = 0
  num_skipped: int = 0
  num_nonfinite: int = 0
  scene_ids: list = dataclasses.field(default_factory=list)
  scene_records: list = dataclasses.field(default_factory=list)  # records of each scene_ids entry
  scene_shapes: list = dataclasses.field(default_factory=list)  # [height, width] of each scene
  stats: BandStatsAccumulator | None = None
  class_counts: np.ndarray | None = None


class SplitTally:
  """Counts the chunks of every job into per-split results, in job order; shared by the
  local and the Beam path so that both report the same counts and refuse the same scenes.

  A scene's jobs are consecutive, so its pixels are summed until the next scene
  begins: a scene with no finite pixel is refused, and its non-finite ones reported.
  """

  def __init__(self, split_names: list[str], first: scenes_lib.Scene):
    self.results = {name: SplitResult(stats=BandStatsAccumulator(first.bands, first.dtype))
                    for name in split_names}
    self._scene: scenes_lib.Scene | None = None
    self._finite = self._nonfinite = self._kept = 0

  def add(self, split: str, scene: scenes_lib.Scene, num_records: int, num_skipped: int,
          num_finite: int, num_nonfinite: int) -> None:
    """Counts one chunk of `scene`, written to `split`."""
    if self._scene is None or scene.scene_id != self._scene.scene_id:
      self._end_scene()
      self._scene, self._finite, self._nonfinite, self._kept = scene, 0, 0, 0
    self._finite += num_finite
    self._nonfinite += num_nonfinite
    self._kept += num_records
    result = self.results[split]
    result.num_records += num_records
    result.num_skipped += num_skipped
    result.num_nonfinite += num_nonfinite
    if not result.scene_ids or result.scene_ids[-1] != scene.scene_id:
      result.scene_ids.append(scene.scene_id)
      result.scene_records.append(0)
      result.scene_shapes.append([scene.height, scene.width])
    result.scene_records[-1] += num_records

  def finish(self) -> dict[str, SplitResult]:
    """The results, once the last scene has passed the checks."""
    self._end_scene()
    self._scene = None
    return self.results

  def _end_scene(self) -> None:
    scene = self._scene
    if scene is None:
      return
    if self._finite == 0:
      raise DataPrepError(f"{scene.image_path}: every pixel has a NaN or infinite value in some band; "
                          "there is no data to tile")
    if not self._kept:
      # Otherwise the scene would be missing from the predictions without a word.
      log.warning("%s: every tile was skipped as mostly nodata (--max-nodata-fraction); the scene "
                  "has no tiles in the dataset", scene.image_path)
    if self._nonfinite:
      log.warning("%s: %d pixels of the kept tiles have NaN or infinite values; they are nodata "
                  "(label 255, left out of the statistics) and written as %g",
                  scene.image_path, self._nonfinite, tiling.nonfinite_fill(scene.nodata))


# A scheme of two or more letters, so that Windows drive letters (C:/) pass; one slash, since
# pathlib turns gs://b into gs:/b.
_URL = re.compile(r"^@?[A-Za-z][A-Za-z0-9+.-]+:/")


def _refuse_urls(**paths) -> None:
  """Object-store URLs would otherwise be taken as relative local paths (gs: a folder)."""
  for name, values in paths.items():
    for path in [values] if isinstance(values, (str, Path)) else values:
      if _URL.match(str(path)):
        raise DataPrepError(f"{name} {path}: URLs are not supported; give a path on a file system "
                            "that this machine (and every Beam worker) mounts")


def convert(
    images: str | Sequence[str],
    out: str | Path,
    labels: str | Sequence[str] | None = None,
    *,
    tile: int = 256,
    stride: int | None = None,
    keep_edge_tiles: bool = True,
    class_map: str | class_maps.ClassMap | None = None,
    class_map_order: str | None = None,
    ignore_colours: Sequence[tuple[int, int, int]] = (),
    unknown_to_ignore: bool = False,
    nodata: float | None = None,
    max_nodata_fraction: float = 0.5,
    split_lists: Mapping[str, str | Path] | None = None,
    split_fractions: Mapping[str, float] | None = None,
    split_seed: int = 0,
    group_pattern: str | None = None,
    subset_fractions: Sequence[float] = splits_lib.DEFAULT_SUBSET_FRACTIONS,
    subset_seed: int = 0,
    subset_lists: Mapping[str, str | Path] | None = None,
    label_stem_replace: tuple[str, str] | None = None,
    workers: int = 2,
    max_shard_bytes: int = 256 << 20,
    overwrite: bool = False,
    progress: bool = True,
    beam: BeamSettings | None = None,
) -> Path:
  """Tiles GeoTIFF scenes into a TFDS dataset (ArrayRecord) at `out`; returns `out`.

  Args:
    images: directories, globs, file paths or `@list.txt` files of image scenes.
    out: final dataset folder (the folder `tfds.builder_from_directory` takes).
    labels: like `images`; paired with images by file stem. None: unlabelled corpus.
    tile, stride: tile side and step in pixels (stride defaults to tile).
    keep_edge_tiles: add a last row/column of tiles flush with the far scene edges
      (overlapping their neighbours) so the whole scene is covered.
    class_map: preset name ("potsdam", "vaihingen"), class map CSV path or ClassMap;
      required for RGB colour labels, optional (names/colours) for index labels.
    class_map_order: "RGB"/"BGR" to override a CSV header's colour column order.
    ignore_colours: label colours mapped to the ignore index 255.
    unknown_to_ignore: map colours missing from the class map to 255 instead of failing.
    nodata: image nodata value overriding the files' own; pixels where every band
      equals it are nodata (labels there become 255).
    max_nodata_fraction: tiles with a larger share of nodata pixels are skipped.
    split_lists: split name → file listing that split's images (one per line).
    split_fractions: split name → fraction of scenes (groups), drawn with `split_seed`.
    group_pattern: regex whose first group names the scene group (split by group).
    subset_fractions, subset_seed: nested labelled subsets recorded per split.
    subset_lists: fraction → file naming the images (one per line, as split
      lists) whose records are that fraction's subset instead of a seeded
      prefix, e.g. {"0.01": "trainR1_RGBIR.txt"} (the reference's 1% list);
      such a subset is not nested in the others.
    label_stem_replace: (old, new) applied to an image stem to find its label's stem.
    workers: reader processes (scenes/chunks in parallel); <= 1 reads in-process.
    max_shard_bytes: ArrayRecord shard size limit.
    overwrite: replace an existing dataset built with other settings.
    progress: show a tqdm bar (tiles/s).
    beam: read and write on this Apache Beam runner instead of local processes
      (`workers` and `progress` then do not apply); the same dataset results.
  Raises:
    DataPrepError: bad input; nothing is left at `out` or in a temporary folder.
  """
  _refuse_urls(images=images, out=out, labels=labels or [])
  out = Path(out).absolute()
  # `stride or tile` would turn an explicit stride of 0 into the tile size.
  stride = tile if stride is None else stride
  for name, value in (("tile", tile), ("stride", stride)):
    if value <= 0:
      raise DataPrepError(f"{name} {value} must be a positive number of pixels")
  if split_lists and split_fractions:
    raise DataPrepError("give split lists or split fractions, not both")
  if not 0.0 <= max_nodata_fraction <= 1.0:
    raise DataPrepError(f"max nodata fraction {max_nodata_fraction} must be in [0, 1]")
  subset_fractions = sorted(set(float(f) for f in subset_fractions))
  if any(not 0.0 < f <= 1.0 for f in subset_fractions):
    raise DataPrepError(f"subset fractions {subset_fractions} must lie in (0, 1]")
  for split, list_file in (split_lists or {}).items():
    if not Path(list_file).is_file():
      problem = "is a directory" if Path(list_file).is_dir() else "does not exist"
      raise DataPrepError(f"{list_file}: split list of {split!r} {problem}")
  subset_lists = _checked_subset_lists(subset_lists)
  splits_lib.group_regex(group_pattern)  # before any file is read
  image_paths = scenes_lib.expand_paths(images, "image")
  label_paths = scenes_lib.expand_paths(labels, "label") if labels is not None else None
  if isinstance(class_map, str):
    class_map_file = [Path(class_map)] if Path(class_map).is_file() else []
    class_map = class_maps.load_class_map(class_map, class_map_order)
  else:
    class_map_file = []
  if ignore_colours:
    if class_map is None:
      raise DataPrepError("--ignore-colour needs a class map (--class-map)")
    class_map = class_map.with_ignore_colours(ignore_colours)

  settings = dict(
      tile=tile, stride=stride, keep_edge_tiles=keep_edge_tiles,
      class_map=dataclasses.asdict(class_map) if class_map else None,
      unknown_to_ignore=unknown_to_ignore, nodata=nodata, max_nodata_fraction=max_nodata_fraction,
      split_lists={k: str(v) for k, v in (split_lists or {}).items()},
      split_fractions=dict(split_fractions or {}), split_seed=split_seed, group_pattern=group_pattern,
      subset_fractions=subset_fractions, subset_seed=subset_seed,
      label_stem_replace=label_stem_replace, labelled=label_paths is not None)
  if subset_lists:  # only then, so that earlier datasets keep their fingerprints
    settings["subset_lists"] = {k: str(v) for k, v in subset_lists.items()}
  list_files = [Path(p) for p in [*(split_lists or {}).values(), *subset_lists.values()]]
  fingerprint = _fingerprint(settings, image_paths + (label_paths or []) + list_files + class_map_file)

  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    with output_folder.lock(out):
      output_folder.remove_leftovers(out)
      existing = read_prep_metadata(out)
      if existing is not None and existing.get("fingerprint") == fingerprint:
        log.info("%s is complete and up to date; skipping", out)
        return out
      output_folder.check_replaceable(out, overwrite)

      scenes = scenes_lib.inspect_scenes(image_paths, label_paths, tile=tile, nodata=nodata,
                                         label_stem_replace=label_stem_replace)
      split_names, assignment = _assign_splits(scenes, split_lists, split_fractions, split_seed,
                                               group_pattern)
      subset_members = {f: splits_lib.subset_list_members(path, assignment)
                        for f, path in subset_lists.items()}
      jobs, job_split = [], []
      for name in split_names:
        for scene in (s for s in scenes if assignment.get(s.scene_id) == name):
          for job in _chunk_jobs(scene, scenes_lib.scene_windows(scene, tile, stride, keep_edge_tiles), tile):
            jobs.append(job)
            job_split.append(name)
      if not jobs:
        raise DataPrepError(f"{', '.join(map(str, split_lists.values()))}: "
                            "the split lists name none of the images")
      options = tiling.TileOptions(
          max_nodata_fraction=max_nodata_fraction, class_map=class_map,
          num_classes=len(class_map.names) if class_map else None, unknown_to_ignore=unknown_to_ignore)

      tmp = output_folder.temp_folder(out)
      try:
        tmp.mkdir()
        first, labelled = scenes[0], label_paths is not None
        features = writer.tile_features(tile, first.bands, first.dtype, labelled)
        if beam is None:
          results, split_infos = _write_splits(tmp, features, split_names, jobs, job_split, options,
                                               workers, max_shard_bytes, f"data_prep {out.name}", progress)
        else:
          from data_prep import beam_pipeline  # apache-beam is an optional extra
          results, split_infos = beam_pipeline.write_splits(tmp, features, split_names, jobs, job_split,
                                                            options, max_shard_bytes, beam)
        if not split_infos:
          raise DataPrepError(f"{', '.join(map(str, image_paths[:3]))}: no tiles kept "
                              f"(all exceed nodata fraction {max_nodata_fraction})")
        metadata = _metadata(results, [s.name for s in split_infos], fingerprint, settings,
                             first, class_map, labelled, subset_fractions, subset_seed,
                             subset_members)
        for name, entry in metadata["splits"].items():
          for fraction, records in entry.get("subset_lists", {}).items():
            # A list names images, not a split: say where it took effect.
            log.info("labelled subset %s of split %r: the %d tiles of the images %s names",
                     fraction, name, len(records), subset_lists[fraction])
        writer.write_dataset_info(
            tmp, features, split_infos, metadata,
            description=f"{first.bands}-band {first.dtype} {tile}x{tile} tiles of "
                        f"{len(scenes)} GeoTIFF scenes, made by data_prep.")
        output_folder.move_into_place(tmp, out)
      except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
  except OSError as e:
    # Reading errors are DataPrepErrors already: what is left is the output's
    # file system (read-only, full, no permission).
    raise DataPrepError(f"{out}: cannot write the dataset ({e.strerror or e})") from None
  return out


def _checked_subset_lists(subset_lists: Mapping[str, str | Path] | None) -> dict[str, Path]:
  """{fraction as written by f"{f:g}": list file}; DataPrepError on a bad fraction or file."""
  out = {}
  for fraction, list_file in (subset_lists or {}).items():
    try:
      value = float(fraction)
    except ValueError:
      raise DataPrepError(f"subset list {fraction}={list_file}: {fraction!r} is not a "
                          "fraction") from None
    if not 0.0 < value <= 1.0:
      raise DataPrepError(f"subset list {fraction}={list_file}: fraction must lie in (0, 1]")
    if not Path(list_file).is_file():
      raise DataPrepError(f"{list_file}: subset list of fraction {fraction} does not exist")
    out[f"{value:g}"] = Path(list_file)
  return out


def _assign_splits(scenes, split_lists, split_fractions, split_seed, group_pattern
                   ) -> tuple[list[str], dict[str, str]]:
  """(split names in writing order, scene id → split); unassigned scenes are left out."""
  if split_lists:
    names, assignment = list(split_lists), splits_lib.splits_from_lists(scenes, split_lists)
  elif split_fractions:
    names = [name for name, f in split_fractions.items() if f > 0]
    assignment = splits_lib.splits_by_scene(scenes, split_fractions, split_seed, group_pattern)
  else:
    names, assignment = ["train"], {s.scene_id: "train" for s in scenes}
  for name in names:
    if not name.replace("_", "").isalnum():
      raise DataPrepError(f"split name {name!r} must be letters, digits and underscores")
  return names, assignment


def _write_splits(tmp: Path, features, split_names: list[str], jobs: list[tiling.TileJob],
                  job_split: list[str], options: tiling.TileOptions, workers: int,
                  max_shard_bytes: int, desc: str, progress: bool
                  ) -> tuple[dict[str, SplitResult], list]:
  """Reads all jobs (in parallel), writes their records; returns per-split results and
  the TFDS SplitInfos of the non-empty splits."""
  tally = SplitTally(split_names, jobs[0].scene)
  split_writers: dict[str, writer.SplitWriter] = {}
  with tqdm.tqdm(total=sum(len(j.windows) for j in jobs), unit="tile", desc=desc,
                 disable=not progress, smoothing=0.1) as bar:
    for name, job, chunk in zip(job_split, jobs, _run_jobs(jobs, options, workers)):
      tally.add(name, job.scene, len(chunk.records), chunk.num_skipped, chunk.num_finite,
                chunk.num_nonfinite)
      split_writer = split_writers.setdefault(name, writer.SplitWriter(tmp, name, features, max_shard_bytes))
      for record in chunk.records:
        split_writer.write(record)
      result = tally.results[name]
      result.stats.merge(chunk.stats)
      result.class_counts = chunk.class_counts + (0 if result.class_counts is None else result.class_counts)
      bar.update(len(job.windows))
  results = tally.finish()
  split_infos = []
  for name in split_names:
    if results[name].num_records == 0:
      log.warning("split %r has no tiles; left out", name)
      continue
    split_infos.append(split_writers[name].close())
  return results, split_infos


def _metadata(results: dict[str, SplitResult], split_names: list[str], fingerprint: str,
              settings: dict, first: scenes_lib.Scene, class_map: class_maps.ClassMap | None,
              labelled: bool, subset_fractions: list[float], subset_seed: int,
              subset_members: dict[str, set[str]]) -> dict:
  """The JSON kept in metadata.json (TFDS `info.metadata`); see docs/data_prep.md."""
  if class_map is not None:
    names, colours = list(class_map.names), [list(c) for c in class_map.colours]
  elif labelled:
    counts = sum(results[n].class_counts for n in split_names)
    num_classes = int(np.flatnonzero(counts[:class_maps.IGNORE_INDEX]).max(initial=-1)) + 1
    names, colours = [str(i) for i in range(num_classes)], [list(c) for c in _palette(num_classes)]
  else:
    names, colours = [], []
  splits = {}
  for name in split_names:
    r = results[name]
    entry = {
        "num_records": r.num_records,
        "num_skipped_tiles": r.num_skipped,
        "nonfinite_pixel_count": r.num_nonfinite,
        "scene_ids": r.scene_ids,
        "scene_shapes": r.scene_shapes,
        "band_stats": r.stats.summary(),
    }
    if labelled:
      counts = r.class_counts[:len(names)]
      entry["class_pixel_counts"] = counts.tolist()
      entry["class_pixel_frequencies"] = (counts / max(counts.sum(), 1)).tolist()
      entry["ignore_pixel_count"] = int(r.class_counts[class_maps.IGNORE_INDEX])
    order = splits_lib.subset_order(r.num_records, subset_seed)
    entry["subset_sizes"] = {f"{f:g}": splits_lib.subset_size(r.num_records, f) for f in subset_fractions}
    entry["subset_order"] = order.tolist()
    starts = np.cumsum([0] + r.scene_records)
    listed = {}
    for fraction, members in subset_members.items():
      records = [i for scene, start, count in zip(r.scene_ids, starts, r.scene_records)
                 if scene in members for i in range(start, start + count)]
      if records:
        listed[fraction] = records
        entry["subset_sizes"][fraction] = len(records)
    if listed:
      entry["subset_lists"] = listed
    splits[name] = entry
  return {
      "format_version": FORMAT_VERSION,
      "fingerprint": fingerprint,
      "settings": settings,
      "tile_size": settings["tile"],
      "stride": settings["stride"],
      "num_bands": first.bands,
      "dtype": first.dtype,
      "labelled": labelled,
      "ignore_index": class_maps.IGNORE_INDEX,
      "class_names": names,
      "class_colours": colours,
      "percentiles": list(PERCENTILES),
      "subset_fractions": subset_fractions,
      "subset_seed": subset_seed,
      "splits": splits,
  }
