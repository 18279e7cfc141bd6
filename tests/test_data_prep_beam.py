"""The Beam path of data_prep (DirectRunner, two workers) against the local path.

The oracle is the local path's dataset from the same inputs (itself checked
against numpy slices and statistics in tests/test_data_prep.py): records equal
one for one, metadata and statistics equal to float precision. Chunks are made
small so that every scene spreads over several elements and shards.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import rasterio
import tensorflow_datasets as tfds

import data_prep
from data_prep import __main__ as cli
from data_prep import convert as convert_module
from data_prep import tiling
from data_prep.beam_settings import BeamSettings
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from data_prep.synthetic import write_corpus
from glc_jax.data.source import open_dataset

DIRECT = BeamSettings("DirectRunner", ("direct_num_workers=2", "direct_running_mode=multi_threading"))
TILE, STRIDE = 32, 24
SMALL_SHARDS = 40_000  # bytes: several shards per split


def _write_like(path, reference, fill):
  """A GeoTIFF with `reference`'s profile, every pixel `fill`."""
  with rasterio.open(reference) as src:
    profile = src.profile
  with rasterio.open(path, "w", **profile) as f:
    f.write(np.full((profile["count"], profile["height"], profile["width"]), fill, profile["dtype"]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Three synthetic scenes and a blank one (all nodata), in three splits and an empty one."""
  root = tmp_path_factory.mktemp("beam")
  write_corpus(root / "corpus", num_scenes=3, height=96, width=80, seed=3)
  images, labels = root / "corpus" / "images", root / "corpus" / "labels"
  _write_like(images / "blank.tif", images / "scene_000.tif", 0)
  _write_like(labels / "blank.tif", labels / "scene_000.tif", 0)
  lists = {"train": ["scene_000", "scene_002"], "val": ["scene_001"], "empty": ["blank"]}
  for split, names in lists.items():
    (root / f"{split}.txt").write_text("\n".join(names) + "\n")
  kwargs = dict(labels=str(labels), tile=TILE, stride=STRIDE, nodata=0.0,
                split_lists={s: str(root / f"{s}.txt") for s in lists}, progress=False)
  return root, str(images), kwargs


@pytest.fixture(scope="module")
def small_chunks():
  """Chunks of four tiles, so that one scene is many Beam elements."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(convert_module, "_CHUNK_BYTES", 4 * TILE * TILE * 4)
    yield


@pytest.fixture(scope="module")
def local_dataset(corpus, small_chunks):
  root, images, kwargs = corpus
  return convert(images, root / "local", workers=0, **kwargs)


def _records(path, split):
  source = tfds.builder_from_directory(os.fspath(path)).as_data_source(split)
  return [source[i] for i in range(len(source))]


def _canonical(records):
  return sorted(records, key=lambda r: (r["scene_id"], tuple(r["window"].tolist())))


def _assert_records_equal(a, b):
  assert len(a) == len(b)
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for key in ra:
      assert np.array_equal(ra[key], rb[key]), key


def _assert_close(a, b, where="metadata"):
  """Equal JSON trees, floats to 1e-12 relative."""
  if isinstance(a, float) or isinstance(b, float):
    assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-300), where
  elif isinstance(a, dict):
    assert a.keys() == b.keys(), where
    for key in a:
      _assert_close(a[key], b[key], f"{where}.{key}")
  elif isinstance(a, list):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      _assert_close(x, y, f"{where}[{i}]")
  else:
    assert a == b, where


def _assert_same_dataset(local, beam):
  _assert_close(json.loads((local / "metadata.json").read_text()),
                json.loads((beam / "metadata.json").read_text()))
  assert (local / "features.json").read_text() == (beam / "features.json").read_text()
  splits = json.loads((local / "metadata.json").read_text())["splits"]
  for split in splits:
    local_records, beam_records = _records(local, split), _records(beam, split)
    _assert_records_equal(_canonical(local_records), _canonical(beam_records))
    # Same order too: record i is the same tile, so subsets select the same tiles.
    _assert_records_equal(local_records, beam_records)


def _no_leftovers(parent, name):
  return not (parent / name).exists() and not list(parent.glob(f".{name}.*"))


@pytest.mark.slow
def test_beam_dataset_equals_local(corpus, small_chunks, local_dataset):
  root, images, kwargs = corpus
  beam = convert(images, root / "beam", beam=DIRECT, max_shard_bytes=SMALL_SHARDS, **kwargs)
  _assert_same_dataset(local_dataset, beam)
  metadata = json.loads((beam / "metadata.json").read_text())
  assert set(metadata["splits"]) == {"train", "val"}  # the all-nodata split is left out
  assert len(list(beam.glob("*-train.array_record-*"))) > 1
  # Nothing of the pipeline's own (summary, TFDS's temporary shards) is left in the dataset.
  assert all(p.name in ("dataset_info.json", "features.json", "metadata.json")
             or ".array_record-" in p.name and not p.name.startswith("incomplete") for p in beam.iterdir())
  assert not list(root.glob(".beam.*"))


@pytest.mark.slow
def test_float32_statistics_match_local(tmp_path, small_chunks):
  rng = np.random.default_rng(1)
  transform = rasterio.transform.from_origin(300000.0, 5800000.0, 0.5, 0.5)
  for name in ("a", "b"):
    pixels = rng.normal(10.0, 50.0, (3, 70, 90)).astype(np.float32)
    pixels[:, 5:9, 11:20] = np.nan  # non-finite pixels: filled, left out of the statistics
    with rasterio.open(tmp_path / f"{name}.tif", "w", driver="GTiff", height=70, width=90, count=3,
                       dtype="float32", crs="EPSG:32632", transform=transform) as f:
      f.write(pixels)
  kwargs = dict(tile=16, split_fractions={"train": 0.5, "val": 0.5}, progress=False)
  local = convert(str(tmp_path / "*.tif"), tmp_path / "local", workers=0, **kwargs)
  beam = convert(str(tmp_path / "*.tif"), tmp_path / "beam", beam=DIRECT, **kwargs)
  _assert_same_dataset(local, beam)


@pytest.mark.slow
def test_worker_error_is_one_line_and_leaves_nothing(corpus, small_chunks, monkeypatch):
  root, images, kwargs = corpus
  real_read = tiling.read_chunk
  def failing_read(job, options):
    if job.scene.scene_id == "scene_001":
      raise DataPrepError(f"{job.scene.image_path}: read failed (injected)")
    return real_read(job, options)
  monkeypatch.setattr(tiling, "read_chunk", failing_read)
  with pytest.raises(DataPrepError) as error:
    convert(images, root / "failed", beam=DIRECT, **kwargs)
  assert str(error.value) == f"{images}/scene_001.tif: read failed (injected)"
  assert _no_leftovers(root, "failed")  # no lock either: the killed-run test shows a rerun


_STALLING_CLI = """
import os, sys, time
from data_prep import __main__ as cli, tiling
read_chunk = tiling.read_chunk
def stalling_read(job, options):
  if job.scene.scene_id == "scene_001":  # a worker is mid-run: say so, then hang until killed
    open(os.environ["STALL_MARKER"], "w").close()
    time.sleep(600)
  return read_chunk(job, options)
tiling.read_chunk = stalling_read
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killed_run_leaves_nothing_a_reader_accepts_and_rerun_completes(corpus, local_dataset):
  root, images, kwargs = corpus
  out, marker = root / "killed", root / "stalled"
  args = ["--images", images, "--labels", kwargs["labels"], "--tile", str(TILE), "--stride", str(STRIDE),
          "--nodata", "0", "--out", str(out), "--no-progress", "--runner", "DirectRunner",
          "--beam_pipeline_options", ",".join(DIRECT.options)]
  for split, path in kwargs["split_lists"].items():
    args += ["--split-list", f"{split}={path}"]
  proc = subprocess.Popen([sys.executable, "-c", _STALLING_CLI, *args],
                          env={**os.environ, "STALL_MARKER": str(marker)},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 120
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    assert marker.exists(), f"the Beam run never reached the stalling read (exit {proc.poll()})"
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
  assert list(root.glob(".killed.incomplete-*")) and not out.exists()
  with pytest.raises(FileNotFoundError):
    open_dataset(out, "train")
  assert cli.main(args) == 0
  _assert_same_dataset(local_dataset, out)
  assert not list(root.glob(".killed.*"))


def test_without_apache_beam_one_line_install_hint(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, "apache_beam", None)  # what an install without the extra sees
  monkeypatch.delitem(sys.modules, "data_prep.beam_pipeline", raising=False)
  monkeypatch.delattr(data_prep, "beam_pipeline", raising=False)  # imported by an earlier test
  _write_like_scene(tmp_path / "a.tif")
  code = cli.main(["--images", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--beam",
                   "--tile", "16", "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1
  assert "apache-beam" in err and "pip install -e '.[beam]'" in err
  assert _no_leftovers(tmp_path, "out")


def _write_like_scene(path):
  with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=3, dtype="uint8",
                     crs="EPSG:32632", transform=rasterio.transform.from_origin(300000.0, 5800000.0, 0.5, 0.5)) as f:
    f.write(np.ones((3, 32, 32), np.uint8))


@pytest.mark.parametrize("flags,message", [
    (["--beam", "--beam_pipeline_options", "runner=DataflowRunner"], "choose the runner with --runner"),
    (["--beam_pipeline_options", "direct_num_workers=2"], "needs --beam or --runner"),
    (["--beam", "--beam_pipeline_options", "direct_num_workers=2,,x=1"], "key=value"),
    (["--beam", "--out", "gs://bucket/tiles"], "out gs://bucket/tiles: URLs are not supported"),
])
def test_bad_beam_flags_one_line_error(tmp_path, capsys, flags, message):
  _write_like_scene(tmp_path / "a.tif")
  args = ["--images", str(tmp_path / "a.tif"), "--out", str(tmp_path / "out"), "--tile", "16",
          "--no-progress", *flags]
  assert cli.main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and message in err
  assert _no_leftovers(tmp_path, "out") and not (tmp_path / "gs:").exists()


def test_stats_merge_tolerates_accumulators_that_saw_nothing():
  """Runners may merge empty accumulators (Beam's wrapper of a plain function then calls it
  on an empty chain); the merge must give the same sums as the non-empty parts alone."""
  from apache_beam.transforms.core import CallableWrapperCombineFn
  from data_prep import beam_pipeline
  from data_prep.stats import BandStatsAccumulator

  def part(values, labels):
    stats = BandStatsAccumulator(2, "uint8")
    stats.add(np.asarray(values, np.uint8))
    return stats, np.bincount(labels, minlength=256).astype(np.int64)

  combine = CallableWrapperCombineFn(beam_pipeline._merge_stats)
  empty = combine.merge_accumulators([combine.create_accumulator(), combine.create_accumulator()])
  full = combine.add_input(combine.create_accumulator(), part([[1, 2], [3, 4]], [0, 1]))
  full = combine.add_input(full, part([[5, 6]], [1]))
  stats, class_counts = combine.extract_output(combine.merge_accumulators([empty, full, empty]))
  assert stats.hist[0, [1, 3, 5]].tolist() == [1, 1, 1] and stats.hist.sum() == 6
  assert class_counts[:2].tolist() == [1, 2] and class_counts.sum() == 3
