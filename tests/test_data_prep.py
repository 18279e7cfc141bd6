"""data_prep → TFDS ArrayRecord → glc_jax.data.source, checked against the source rasters.

Fixtures are small GeoTIFFs written with rasterio; oracles are numpy slices of the
scene arrays, affine arithmetic, and numpy statistics.
"""
import math
import os
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import pytest
import rasterio
import tensorflow_datasets as tfds
from rasterio.transform import Affine

from data_prep import __main__ as cli
from data_prep.class_maps import PRESETS
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from glc_jax.data.source import open_dataset

CRS = "EPSG:32632"


def write_tif(path, array, transform=None, crs=CRS, nodata=None):
  """array: (bands, H, W)."""
  transform = transform or Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 5800000.0)
  with rasterio.open(path, "w", driver="GTiff", height=array.shape[1], width=array.shape[2],
                     count=array.shape[0], dtype=array.dtype, crs=crs, transform=transform,
                     nodata=nodata) as f:
    f.write(array)
  return path


def random_scene(rng, dtype, bands, height, width):
  if dtype == "float32":
    return rng.normal(10.0, 50.0, (bands, height, width)).astype(np.float32)
  info = np.iinfo(dtype)
  return rng.integers(0, int(info.max) + 1, (bands, height, width), dtype=dtype)


def starts(size, tile):
  out = list(range(0, size - tile + 1, tile))
  return out + [size - tile] if out[-1] + tile < size else out


def no_leftovers(tmp_path, name="out"):
  return not (tmp_path / name).exists() and not list(tmp_path.glob(f".{name}.*"))


@pytest.mark.parametrize("dtype,workers,shard_bytes", [
    ("uint8", 0, 1 << 30), ("uint16", 0, 20_000), ("float32", 2, 1 << 30)])
def test_round_trip_equals_source_windows(tmp_path, dtype, workers, shard_bytes):
  rng = np.random.default_rng(0)
  sizes = {"a": (37, 53), "b": (45, 31)}
  transforms = {"a": Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 5800000.0),
                # Not float32-representable: catches a float32 round trip of the transform.
                "b": Affine(0.3, 0.01, 345678.123456789, 0.02, -0.3, 5812345.987654321)}
  arrays = {}
  for name, (h, w) in sizes.items():
    arrays[name] = random_scene(rng, dtype, 3, h, w)
    write_tif(tmp_path / f"{name}.tif", arrays[name], transforms[name])
  out = convert([str(tmp_path / "*.tif")], tmp_path / "out", tile=16, workers=workers,
                max_shard_bytes=shard_bytes, progress=False)
  if shard_bytes < 1 << 20:
    assert len(list(out.glob("*array_record*"))) > 1

  source, info = open_dataset(out, "train")
  expected = {(n, r, c) for n, (h, w) in sizes.items() for r in starts(h, 16) for c in starts(w, 16)}
  assert len(source) == len(expected) == info.num_records
  seen = set()
  for i in range(len(source)):
    rec = source[i]
    row, col, h, w = rec["window"]
    name = rec["scene_id"]
    assert (h, w) == (16, 16) and rec["image"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(rec["image"], np.moveaxis(arrays[name], 0, -1)[row:row + h, col:col + w])
    a, b, c, d, e, f = tuple(transforms[name])[:6]
    np.testing.assert_allclose(rec["transform"], [a, b, c + a * col + b * row, d, e, f + d * col + e * row],
                               rtol=0, atol=1e-9)
    assert rec["crs"] == CRS and "label" not in rec
    seen.add((name, int(row), int(col)))
  assert seen == expected
  # The same records through TFDS directly and through Grain.
  tfds_source = tfds.builder_from_directory(str(out)).as_data_source("train")
  np.testing.assert_array_equal(tfds_source[3]["image"], source[3]["image"])
  np.testing.assert_array_equal(grain.MapDataset.source(source)[5]["image"], source[5]["image"])
  assert "tensorflow" not in sys.modules


def test_band_stats_match_numpy(tmp_path):
  rng = np.random.default_rng(1)
  ints = rng.integers(0, 4000, (2, 32, 48), dtype=np.uint16)
  write_tif(tmp_path / "i.tif", ints)
  _, info = open_dataset(convert(str(tmp_path / "i.tif"), tmp_path / "ints", tile=16,
                                 workers=0, progress=False), "train")
  pixels = ints.reshape(2, -1).astype(np.float64)
  st = info.band_stats
  np.testing.assert_allclose(st.mean, pixels.mean(1), rtol=1e-12)
  np.testing.assert_allclose(st.std, pixels.std(1), rtol=1e-10)
  np.testing.assert_array_equal(st.min, pixels.min(1))
  np.testing.assert_array_equal(st.max, pixels.max(1))
  for q, values in st.percentiles.items():
    np.testing.assert_array_equal(values, np.percentile(ints.reshape(2, -1), q, axis=1, method="inverted_cdf"))

  floats = rng.normal(0.0, 100.0, (1, 32, 32)).astype(np.float32)
  write_tif(tmp_path / "f.tif", floats)
  _, info = open_dataset(convert(str(tmp_path / "f.tif"), tmp_path / "floats", tile=16,
                                 workers=0, progress=False), "train")
  for q, values in info.band_stats.percentiles.items():
    true = np.percentile(floats.ravel(), q, method="inverted_cdf")
    assert abs(values[0]) <= abs(true) and abs(true - values[0]) <= abs(true) * 2.0**-7


def test_colour_labels_map_to_class_indices(tmp_path):
  rng = np.random.default_rng(2)
  potsdam = PRESETS["potsdam"]
  colours = np.array(potsdam.colours + ((0, 0, 0),), np.uint8)  # black = eroded boundary
  truth = rng.integers(0, len(colours), (40, 40))
  label_rgb = np.moveaxis(colours[truth], -1, 0)
  image = rng.integers(0, 256, (4, 40, 40), dtype=np.uint8)
  image[:, :5, :7] = 0  # nodata corner, inside the first tile
  write_tif(tmp_path / "img" / "s1.tif", image, nodata=0) if (tmp_path / "img").mkdir() is None else None
  (tmp_path / "lbl").mkdir()
  write_tif(tmp_path / "lbl" / "s1.tif", label_rgb)
  expected = np.where(truth == len(colours) - 1, 255, truth).astype(np.uint8)
  expected[:5, :7] = 255

  out = convert(str(tmp_path / "img"), tmp_path / "preset", labels=str(tmp_path / "lbl"),
                class_map="potsdam", tile=20, workers=0, progress=False)
  source, info = open_dataset(out, "train")
  assert info.class_names == potsdam.names
  np.testing.assert_array_equal(info.class_colours, np.array(potsdam.colours))
  for rec in (source[i] for i in range(len(source))):
    row, col, h, w = rec["window"]
    np.testing.assert_array_equal(rec["label"], expected[row:row + h, col:col + w])
  np.testing.assert_array_equal(info.class_pixel_counts, np.bincount(expected.ravel(), minlength=256)[:6])

  # A CSV whose header puts the colour columns in B, G, R order.
  csv = tmp_path / "classes.csv"
  csv.write_text("name,B,G,R\n" + "".join(f"c{i},{b},{g},{r}\n" for i, (r, g, b) in
                                           enumerate(potsdam.colours)))
  out = convert(str(tmp_path / "img"), tmp_path / "csv", labels=str(tmp_path / "lbl"),
                class_map=str(csv), ignore_colours=[(0, 0, 0)], tile=20, workers=0, progress=False)
  source, info = open_dataset(out, "train")
  assert info.class_names == tuple(f"c{i}" for i in range(6))
  np.testing.assert_array_equal(source[0]["label"], expected[:20, :20])


def test_index_labels_and_nodata_tiles(tmp_path):
  rng = np.random.default_rng(3)
  image = rng.integers(1, 256, (2, 40, 40), dtype=np.uint8)
  image[:, 20:, 20:] = 0          # tile (20, 20) is all nodata: skipped
  image[:, :20, :4] = 0           # tile (0, 0) is 20% nodata: kept, label 255 there
  label = rng.integers(0, 5, (1, 40, 40), dtype=np.uint8)
  write_tif(tmp_path / "x.tif", image, nodata=0)
  write_tif(tmp_path / "x_lbl.tif", label)
  out = convert(str(tmp_path / "x.tif"), tmp_path / "out", labels=str(tmp_path / "x_lbl.tif"),
                tile=20, max_nodata_fraction=0.5, label_stem_replace=("x", "x_lbl"), workers=0,
                progress=False)
  source, info = open_dataset(out, "train")
  windows = sorted(tuple(source[i]["window"][:2]) for i in range(len(source)))
  assert windows == [(0, 0), (0, 20), (20, 0)]
  assert info.metadata["splits"]["train"]["num_skipped_tiles"] == 1
  assert info.class_names == tuple("01234")
  first = next(source[i] for i in range(len(source)) if tuple(source[i]["window"][:2]) == (0, 0))
  expected = label[0, :20, :20].copy()
  expected[:, :4] = 255
  np.testing.assert_array_equal(first["label"], expected)
  valid = image[:, :20, 4:20].reshape(2, -1)  # stats use valid pixels of kept tiles only
  kept = np.concatenate([valid, image[:, :20, 20:].reshape(2, -1), image[:, 20:, :20].reshape(2, -1)], 1)
  np.testing.assert_allclose(info.band_stats.mean, kept.mean(1), rtol=1e-12)


def test_infrared_band_flagged_as_alpha_is_data(tmp_path):
  image = np.full((4, 32, 32), 100, np.uint8)
  image[3] = 0  # IR band all zero: would be an all-transparent alpha
  write_tif(tmp_path / "rgbir.tif", image)  # GDAL flags band 4 of 4-band uint8 files as alpha
  with rasterio.open(tmp_path / "rgbir.tif") as f:
    assert any(rasterio.enums.MaskFlags.alpha in flags for flags in f.mask_flag_enums)
  source, _ = open_dataset(convert(str(tmp_path / "rgbir.tif"), tmp_path / "out", tile=16, workers=0,
                                   progress=False), "train")
  assert len(source) == 4


def _convert_scenes(tmp_path, out_name, **kwargs):
  return convert(str(tmp_path / "scenes"), tmp_path / out_name, tile=8, workers=0, progress=False, **kwargs)


@pytest.fixture
def ten_scenes(tmp_path):
  (tmp_path / "scenes").mkdir()
  rng = np.random.default_rng(4)
  for big in range(5):
    for part in range(2):
      write_tif(tmp_path / "scenes" / f"city_{big}__{part}.tif", random_scene(rng, "uint8", 1, 16, 24))
  return tmp_path


def test_subsets_are_nested_and_deterministic(ten_scenes):
  out = _convert_scenes(ten_scenes, "a", subset_seed=7)
  again = _convert_scenes(ten_scenes, "b", subset_seed=7)
  other = _convert_scenes(ten_scenes, "c", subset_seed=8)
  full, info = open_dataset(out, "train")
  n = len(full)  # 10 scenes x 6 tiles
  assert n == 60
  previous = set()
  for f in (0.01, 0.05, 0.1, 0.25, 0.5, 1.0):
    subset, sub_info = open_dataset(out, "train", subset_fraction=f)
    members = set(subset.record_indices.tolist())
    assert len(members) == len(subset) == sub_info.num_records == max(1, math.floor(f * n + 0.5))
    assert previous <= members
    previous = members
    assert members == set(open_dataset(again, "train", subset_fraction=f)[0].record_indices.tolist())
    windows = (subset[i]["window"] for i in range(len(subset)))
    assert all(np.array_equal(w, full[j]["window"]) for w, j in zip(windows, subset.record_indices))
  assert (set(open_dataset(other, "train", 0.25)[0].record_indices.tolist())
          != set(open_dataset(out, "train", 0.25)[0].record_indices.tolist()))
  with pytest.raises(ValueError, match="0.3"):
    open_dataset(out, "train", subset_fraction=0.3)


def test_split_by_scene_keeps_groups_together(ten_scenes):
  fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
  out = _convert_scenes(ten_scenes, "s", split_fractions=fractions, split_seed=3,
                        group_pattern=r"(city_\d+)")
  group_split = {}
  for split in fractions:
    source, info = open_dataset(out, split)
    for i in range(len(source)):
      group = source[i]["scene_id"].split("__")[0]
      assert group_split.setdefault(group, split) == split
  assert sorted(group_split.values()).count("train") == 3 and len(group_split) == 5
  same = _convert_scenes(ten_scenes, "s2", split_fractions=fractions, split_seed=3,
                         group_pattern=r"(city_\d+)")
  for split in fractions:
    assert open_dataset(same, split)[1].metadata["splits"][split]["scene_ids"] == \
        open_dataset(out, split)[1].metadata["splits"][split]["scene_ids"]


def test_split_lists(ten_scenes):
  (ten_scenes / "val.txt").write_text("city_0__0.tif\ncity_0__1.tif\n")
  (ten_scenes / "train.txt").write_text("".join(f"city_{i}__{p}.tif\n" for i in range(1, 5) for p in (0, 1)))
  out = _convert_scenes(ten_scenes, "l", split_lists={"train": ten_scenes / "train.txt",
                                                      "val": ten_scenes / "val.txt"})
  _, info = open_dataset(out, "val")
  assert info.splits == {"train": 48, "val": 12}
  assert info.metadata["splits"]["val"]["scene_ids"] == ["city_0__0", "city_0__1"]
  with pytest.raises(KeyError, match="test"):
    open_dataset(out, "test")


def test_rerun_skips_complete_and_replaces_only_with_overwrite(ten_scenes):
  out = _convert_scenes(ten_scenes, "r")
  stamp = (out / "dataset_info.json").stat().st_mtime_ns
  stale = ten_scenes / ".r.incomplete-999999999"  # left by a killed run (dead pid)
  stale.mkdir()
  (stale / "junk").write_text("x")
  _convert_scenes(ten_scenes, "r")
  assert (out / "dataset_info.json").stat().st_mtime_ns == stamp and not stale.exists()
  with pytest.raises(DataPrepError, match="--overwrite"):
    _convert_scenes(ten_scenes, "r", stride=4)
  _convert_scenes(ten_scenes, "r", stride=4, overwrite=True)
  assert open_dataset(out, "train")[1].num_records > 60
  assert not list(ten_scenes.glob(".r.*"))


@pytest.mark.slow
def test_kill_9_leaves_nothing_a_reader_accepts(tmp_path):
  write_tif(tmp_path / "big.tif", np.random.default_rng(5).integers(0, 256, (4, 1024, 1024), dtype=np.uint8))
  out = tmp_path / "out"
  cmd = [sys.executable, "-m", "data_prep", "--images", str(tmp_path / "big.tif"), "--out", str(out),
         "--tile", "16", "--workers", "1", "--no-progress"]
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  while not list(tmp_path.glob(".out.incomplete-*")) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.005)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert list(tmp_path.glob(".out.incomplete-*")) and not out.exists()
  with pytest.raises(FileNotFoundError):
    open_dataset(out, "train")
  convert(str(tmp_path / "big.tif"), out, tile=256, workers=0, progress=False)
  assert open_dataset(out, "train")[1].num_records == 16 and no_leftovers(tmp_path, "nothing")
  assert not list(tmp_path.glob(".out.*"))


def _bad_case(tmp_path, case):
  """Writes one kind of bad input; returns CLI args (without --out) and expected message parts."""
  rng = np.random.default_rng(6)
  img, lbl = tmp_path / "img", tmp_path / "lbl"
  img.mkdir()
  lbl.mkdir()
  write_tif(img / "a.tif", random_scene(rng, "uint8", 4, 32, 32))
  write_tif(lbl / "a.tif", np.zeros((1, 32, 32), np.uint8))
  args = ["--images", str(img), "--labels", str(lbl), "--tile", "16"]
  if case == "truncated":
    data = (img / "a.tif").read_bytes()
    (img / "a.tif").write_bytes(data[:len(data) // 2])
    return args, ["a.tif"]
  if case == "not_a_tiff":
    (img / "a.tif").write_bytes(b"this is not a tiff at all" * 10)
    return args, ["a.tif", "cannot open image"]
  if case == "size_mismatch":
    write_tif(lbl / "a.tif", np.zeros((1, 32, 30), np.uint8))
    return args, ["lbl/a.tif", "32x30", "32x32"]
  if case == "transform_mismatch":
    write_tif(lbl / "a.tif", np.zeros((1, 32, 32), np.uint8), Affine(0.5, 0, 300001.0, 0, -0.5, 5800000.0))
    return args, ["lbl/a.tif", "geotransform"]
  if case == "band_count":
    write_tif(img / "b.tif", random_scene(rng, "uint8", 3, 32, 32))
    write_tif(lbl / "b.tif", np.zeros((1, 32, 32), np.uint8))
    return args, ["b.tif", "3 bands", "4"]
  if case == "unknown_colour":
    colour = np.zeros((3, 32, 32), np.uint8)
    colour[:] = np.array([255, 255, 255], np.uint8)[:, None, None]
    colour[:, 21, 6] = (12, 34, 56)
    write_tif(lbl / "a.tif", colour)
    return args + ["--class-map", "potsdam", "--tile", "16"], ["lbl/a.tif", "(12, 34, 56)", "row 21, col 6"]
  if case == "label_out_of_range":
    index = np.zeros((1, 32, 32), np.uint8)
    index[0, 17, 3] = 9
    write_tif(lbl / "a.tif", index)
    return args + ["--class-map", "potsdam"], ["lbl/a.tif", "value 9", "row 17, col 3", "below 6"]
  if case == "empty":
    return ["--images", str(tmp_path / "empty_dir_*")], ["no image GeoTIFF files"]
  if case == "tile_too_large":
    return args + ["--tile", "64"], ["a.tif", "32x32", "smaller than tile 64"]
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated", "not_a_tiff", "size_mismatch", "transform_mismatch",
                                  "band_count", "unknown_colour", "label_out_of_range", "empty",
                                  "tile_too_large"])
def test_bad_input_one_line_error_and_nothing_left(tmp_path, capsys, case):
  args, parts = _bad_case(tmp_path, case)
  code = cli.main(args + ["--out", str(tmp_path / "out"), "--workers", "0", "--no-progress"])
  err = capsys.readouterr().err.strip()
  assert code != 0
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("data_prep: error: ")
  for part in parts:
    assert part in err
  assert no_leftovers(tmp_path)


def test_cli_converts_and_unknown_colours_can_be_ignored(tmp_path, capsys):
  colour = np.zeros((3, 16, 16), np.uint8)
  colour[:, :, :8] = np.array([0, 255, 0], np.uint8)[:, None, None]   # tree
  colour[:, :, 8:] = np.array([9, 9, 9], np.uint8)[:, None, None]     # not an ISPRS colour
  write_tif(tmp_path / "img.tif", np.ones((4, 16, 16), np.uint8))
  write_tif(tmp_path / "lbl.tif", colour)
  code = cli.main(["--images", str(tmp_path / "img.tif"), "--labels", str(tmp_path / "lbl.tif"),
                   "--label-stem-replace", "img=lbl", "--class-map", "vaihingen", "--unknown-to-ignore",
                   "--tile", "16", "--subset-fractions", "0.5,1", "--out", str(tmp_path / "out"),
                   "--workers", "0", "--no-progress"])
  assert code == 0
  source, info = open_dataset(tmp_path / "out", "train", subset_fraction=0.5)
  expected = np.full((16, 16), 255, np.uint8)
  expected[:, :8] = PRESETS["vaihingen"].names.index("tree")
  np.testing.assert_array_equal(source[0]["label"], expected)
  assert info.metadata["subset_fractions"] == [0.5, 1.0]
