"""GeoTIFF predictions and the confusion-matrix PNG: exact read-back checks."""
import os
import warnings

import matplotlib.image
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window, transform as window_transform

from glc_jax import predictions

COLOURS = [(255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0),
           (255, 255, 0)]
SCENE_TRANSFORM = Affine(0.05, 0.0, 366000.0, 0.0, -0.05, 5808000.0)
CRS_STRING = "EPSG:32633"


def _colour_oracle(classes, nodata=255):
  rgb = np.zeros(classes.shape + (3,), np.uint8)
  for (r, c), k in np.ndenumerate(classes):
    if k != nodata:
      rgb[r, c] = COLOURS[k]
  return rgb


def test_whole_scene_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  classes = rng.integers(0, 5, size=(37, 53)).astype(np.uint8)
  index_path, colour_path = tmp_path / "pred.tif", tmp_path / "pred_rgb.tif"
  predictions.write_prediction(index_path, colour_path, classes, crs=CRS_STRING,
                               transform=tuple(SCENE_TRANSFORM)[:6],
                               colours=COLOURS)
  assert sorted(os.listdir(tmp_path)) == ["pred.tif", "pred_rgb.tif"]
  with rasterio.open(index_path) as src:
    assert src.crs == CRS.from_epsg(32633)
    assert src.transform == SCENE_TRANSFORM
    assert src.count == 1 and src.dtypes[0] == "uint8" and src.nodata == 255
    np.testing.assert_array_equal(src.read(1), classes)
    cmap = src.colormap(1)
    for k, rgb in enumerate(COLOURS):
      assert cmap[k][:3] == rgb
  with rasterio.open(colour_path) as src:
    assert src.crs == CRS.from_epsg(32633)
    assert src.transform == SCENE_TRANSFORM
    assert src.count == 3 and src.dtypes == ("uint8",) * 3
    np.testing.assert_array_equal(np.moveaxis(src.read(), 0, -1),
                                  _colour_oracle(classes))


# rasterio's own window_transform still uses Affine's deprecated `*`.
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_tiles_written_into_their_windows(tmp_path):
  rng = np.random.default_rng(1)
  height, width, tile = 300, 270, 100
  scene = np.full((height, width), 255, np.uint8)
  tiles = []
  for row in range(0, height, tile):
    for col in range(0, width, tile):
      if (row, col) == (100, 200):
        continue  # a tile with no prediction: must read back as nodata
      h, w = min(tile, height - row), min(tile, width - col)
      classes = rng.integers(0, 5, size=(h, w)).astype(np.uint8)
      scene[row:row + h, col:col + w] = classes
      tile_affine = window_transform(Window(col, row, w, h), SCENE_TRANSFORM)
      tiles.append((classes, (row, col, h, w), tile_affine))

  # The dataset stores per-tile transforms; the scene's is recovered from one.
  _, window, tile_affine = tiles[-1]
  transform = predictions.scene_transform(tuple(tile_affine)[:6], window)
  assert transform.almost_equals(SCENE_TRANSFORM)

  wkt = CRS.from_epsg(32633).to_wkt()
  index_path, colour_path = tmp_path / "s.tif", tmp_path / "s_rgb.tif"
  with predictions.PredictionWriter(index_path, colour_path, height=height,
                                    width=width, crs=wkt, transform=transform,
                                    colours=COLOURS) as writer:
    for classes, window, _ in tiles:
      writer.write(classes, window)
    assert not index_path.exists()  # only renamed into place on exit
  with rasterio.open(index_path) as src:
    assert src.crs == CRS.from_epsg(32633)
    assert src.transform.almost_equals(SCENE_TRANSFORM)
    np.testing.assert_array_equal(src.read(1), scene)
  with rasterio.open(colour_path) as src:
    np.testing.assert_array_equal(np.moveaxis(src.read(), 0, -1),
                                  _colour_oracle(scene))


def test_failure_leaves_nothing_and_keeps_old_file(tmp_path):
  classes = np.zeros((8, 8), np.uint8)
  old = tmp_path / "old.tif"
  predictions.write_prediction(old, None, classes, crs=CRS_STRING,
                               transform=SCENE_TRANSFORM, colours=COLOURS)
  before = old.read_bytes()
  with pytest.raises(RuntimeError, match="boom"):
    with predictions.PredictionWriter(old, tmp_path / "new_rgb.tif", height=8,
                                      width=8, crs=CRS_STRING,
                                      transform=SCENE_TRANSFORM,
                                      colours=COLOURS) as writer:
      writer.write(np.ones((8, 8), np.uint8))
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == ["old.tif"]
  assert old.read_bytes() == before


def test_no_crs_is_allowed(tmp_path):
  path = tmp_path / "p.tif"
  predictions.write_prediction(path, None, np.zeros((4, 4), np.uint8), crs=None,
                               transform=Affine.translation(10.0, 20.0),
                               colours=COLOURS)
  with rasterio.open(path) as src:
    assert src.crs is None


def test_bad_inputs_raise(tmp_path):
  path = tmp_path / "p.tif"
  kwargs = dict(crs=CRS_STRING, transform=SCENE_TRANSFORM, colours=COLOURS)
  with pytest.raises(ValueError, match="class index 7 has no colour"):
    predictions.write_prediction(path, None, np.full((4, 4), 7, np.uint8),
                                 **kwargs)
  with pytest.raises(ValueError, match="unreadable CRS"):
    predictions.write_prediction(path, None, np.zeros((4, 4), np.uint8),
                                 **dict(kwargs, crs="not a crs"))
  with pytest.raises(ValueError, match="6 affine coefficients"):
    predictions.write_prediction(path, None, np.zeros((4, 4), np.uint8),
                                 **dict(kwargs, transform=(1.0, 0.0)))
  with pytest.raises(ValueError, match="colours"):
    predictions.colourise(np.zeros((2, 2), np.uint8), [(1, 2)])
  with pytest.raises(ValueError, match="outside"):
    with predictions.PredictionWriter(path, None, height=4, width=4,
                                      **kwargs) as writer:
      writer.write(np.zeros((2, 2), np.uint8), (3, 3, 2, 2))
  assert os.listdir(tmp_path) == []


def test_confusion_matrix_png(tmp_path):
  path = tmp_path / "cm.png"
  cm = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
  predictions.write_confusion_matrix_png(path, cm, ["a", "b", "c"], title="t")
  assert os.listdir(tmp_path) == ["cm.png"]
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
  with pytest.raises(ValueError, match="class names"):
    predictions.write_confusion_matrix_png(tmp_path / "x.png", cm, ["a"])


REFERENCE_NAMES = ["0", "低矮植被", "其它", "树木", "建筑物", "不透水面", "汽车"]  # its class_dict.txt


def test_confusion_matrix_png_labels_are_drawable(tmp_path):
  """Class names the default font cannot draw (the reference's Chinese ones, in DejaVu Sans)
  are labelled by their index alone, with no missing-glyph warning; others by index and name."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    predictions.write_confusion_matrix_png(tmp_path / "cm.png", np.eye(7, dtype=np.int64),
                                           REFERENCE_NAMES, title="val")
  labels = predictions.class_labels(["imp_surf", "car"] + REFERENCE_NAMES[1:3])
  assert labels[:2] == ["0 imp_surf", "1 car"]
  assert labels[2] in ("2", "2 低矮植被") and labels[3] in ("3", "3 其它")
