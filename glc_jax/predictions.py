"""Georeferenced prediction rasters and the confusion-matrix figure.

Every file is written under a temporary name in its destination folder and
renamed into place only when complete, so a crash never leaves a half-written
output behind under the final name.

Predictions come as two GeoTIFFs carrying the source CRS and geotransform:
a class-index raster (1 band, uint8, with the class colours as its colour
table and `nodata` marking pixels without a prediction) and a colour-mapped
RGB raster (3 bands, uint8; pixels without a prediction are black).
"""
from __future__ import annotations

import collections
import hashlib
import os
import pathlib
import re
import warnings
from typing import Sequence

import numpy as np
import rasterio
from matplotlib import font_manager
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ft2font import FT2Font
from rasterio.crs import CRS
from rasterio.transform import Affine
from rasterio.windows import Window

from glc_jax import files

Transform = Affine | Sequence[float]

NODATA = 255  # the class raster's value for pixels without a prediction

_GTIFF_OPTIONS = dict(driver="GTiff", tiled=True, blockxsize=256,
                      blockysize=256, compress="deflate", bigtiff="IF_SAFER")


_GDAL_SIDECARS = (".aux.xml",)


_SAFE_STEM = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def _hashed_stem(scene_id: str) -> str:
  # '~' never occurs in a kept id, so a hashed stem cannot equal one.
  readable = re.sub(r"[^A-Za-z0-9._-]+", "_", scene_id).strip("._-")[:80] or "scene"
  return f"{readable}~{hashlib.sha256(scene_id.encode()).hexdigest()[:12]}"


def scene_file_stems(scene_ids: Sequence[str]) -> dict[str, str]:
  """A file-name stem for each scene id: distinct ids get distinct stems.

  An id of letters, digits, '.', '_' and '-' (not starting with '.', '_' or
  '-', at most 100 characters) is kept; any other id, and ids that differ only
  in case (one file on a case-insensitive file system), become the id with
  runs of other characters replaced by '_' plus '~' and 12 hex digits of the
  id's SHA-256, e.g. '../../x' -> 'x~<hash>'.
  """
  stems = {i: i if _SAFE_STEM.fullmatch(i) else _hashed_stem(i) for i in scene_ids}
  by_case = collections.Counter(stem.casefold() for stem in stems.values())
  return {i: _hashed_stem(i) if by_case[stem.casefold()] > 1 else stem for i, stem in stems.items()}


def inside(folder: str | os.PathLike, name: str) -> pathlib.Path:
  """`folder/name`, refused (ValueError) unless it resolves to a path inside `folder`."""
  root = pathlib.Path(folder).resolve()
  path = pathlib.Path(folder) / name
  if not path.resolve().is_relative_to(root) or path.resolve() == root:
    raise ValueError(f"{path} resolves to {path.resolve()}, outside {root}; refusing to write it")
  return path


def _as_affine(transform: Transform) -> Affine:
  if isinstance(transform, Affine):
    return transform
  values = [float(v) for v in transform]
  if len(values) not in (6, 9):
    raise ValueError(f"predictions: transform needs the 6 affine coefficients "
                     f"(a, b, c, d, e, f), got {len(values)} values")
  return Affine(*values[:6])


def _as_crs(crs: str | CRS | None) -> CRS | None:
  if crs is None or isinstance(crs, CRS):
    return crs
  if not str(crs).strip():
    return None
  try:
    return CRS.from_user_input(crs)
  except rasterio.errors.CRSError as e:
    raise ValueError(
        f"predictions: unreadable CRS {str(crs)[:60]!r}: {e}") from e


def scene_transform(tile_transform: Transform,
                    window: Sequence[int]) -> Affine:
  """Geotransform of a scene, from one of its tiles.

  Args:
    tile_transform: the tile's affine (a, b, c, d, e, f).
    window: the tile's (row, col, height, width) in the scene.
  """
  row, col = int(window[0]), int(window[1])
  return _as_affine(tile_transform) @ Affine.translation(-col, -row)


def _colour_table(colours: Sequence[Sequence[int]]) -> np.ndarray:
  table = np.asarray(colours)
  if table.ndim != 2 or table.shape[1] != 3 or not 0 < len(table) <= 255:
    raise ValueError(f"predictions: class colours must be 1..255 (r, g, b) "
                     f"triples, got shape {table.shape}")
  if table.min() < 0 or table.max() > 255:
    raise ValueError("predictions: class colour components must lie in 0..255")
  return table.astype(np.uint8)


def _check_classes(classes: np.ndarray, num_classes: int,
                   nodata: int | None) -> np.ndarray:
  classes = np.asarray(classes)
  if classes.ndim != 2 or not np.issubdtype(classes.dtype, np.integer):
    raise ValueError(f"predictions: class map must be an (H, W) integer array, "
                     f"got {classes.dtype} {classes.shape}")
  known = (classes >= 0) & (classes < num_classes)
  if nodata is not None:
    known |= classes == nodata
  if not known.all():
    raise ValueError(f"predictions: class index {classes[~known][0]} has no "
                     f"colour ({num_classes} colours, nodata={nodata})")
  return classes.astype(np.uint8)


def colourise(classes: np.ndarray, colours: Sequence[Sequence[int]],
              nodata: int | None = None) -> np.ndarray:
  """(H, W) class indices -> (H, W, 3) uint8 RGB; `nodata` pixels black."""
  table = _colour_table(colours)
  classes = _check_classes(classes, len(table), nodata)
  lut = np.zeros((256, 3), np.uint8)
  lut[:len(table)] = table
  if nodata is not None:
    lut[nodata] = 0
  return lut[classes]


class PredictionWriter:
  """Writes a scene's class-index GeoTIFF (and optionally its colour version)
  whole or tile by tile; the files appear under their names on a clean exit.

  Usage:
    with PredictionWriter(index_path, colour_path, height=H, width=W,
                          crs=crs, transform=transform, colours=colours) as w:
      for classes, window in tiles:
        w.write(classes, window)

  On an exception inside the block nothing is left behind. Pixels no tile
  covers read as `nodata` in the index raster and black in the colour raster.
  """

  def __init__(self, index_path: str | os.PathLike,
               colour_path: str | os.PathLike | None = None, *,
               height: int, width: int, crs: str | CRS | None,
               transform: Transform, colours: Sequence[Sequence[int]],
               nodata: int | None = NODATA):
    self._colours = _colour_table(colours)
    if nodata is not None and not len(self._colours) <= nodata <= 255:
      raise ValueError(f"predictions: nodata {nodata} must lie in "
                       f"{len(self._colours)}..255, outside the class indices")
    self._nodata = nodata
    self._height, self._width = int(height), int(width)
    profile = dict(_GTIFF_OPTIONS, height=self._height, width=self._width,
                   dtype="uint8", crs=_as_crs(crs),
                   transform=_as_affine(transform))
    self._outputs = [(os.fspath(index_path),
                      dict(profile, count=1, nodata=nodata))]
    if colour_path is not None:
      self._outputs.append((os.fspath(colour_path),
                            dict(profile, count=3, photometric="RGB")))
    self._temps: list[pathlib.Path] = []
    self._datasets: list[rasterio.io.DatasetWriter] = []

  def __enter__(self) -> PredictionWriter:
    try:
      for path, profile in self._outputs:
        self._temps.append(files.temp_beside(path))
        with warnings.catch_warnings():
          # An ungeoreferenced source (identity transform) gives an
          # ungeoreferenced prediction; that is faithful, not a fault.
          warnings.simplefilter("ignore",
                                rasterio.errors.NotGeoreferencedWarning)
          self._datasets.append(rasterio.open(self._temps[-1], "w", **profile))
      palette = {k: tuple(int(c) for c in rgb) + (255,)
                 for k, rgb in enumerate(self._colours)}
      self._datasets[0].write_colormap(1, palette)
    except BaseException:
      self._close(commit=False)
      raise
    return self

  def write(self, classes: np.ndarray,
            window: Sequence[int] | None = None) -> None:
    """Writes (h, w) class indices at `window` = (row, col, h, w) in the
    scene, or the whole scene when `window` is None."""
    classes = _check_classes(classes, len(self._colours), self._nodata)
    row, col, h, w = (0, 0, self._height, self._width) if window is None else (
        int(v) for v in window)
    if classes.shape != (h, w):
      raise ValueError(f"predictions: class map shape {classes.shape} does not "
                       f"match window size {(h, w)}")
    if row < 0 or col < 0 or row + h > self._height or col + w > self._width:
      raise ValueError(f"predictions: window {(row, col, h, w)} outside the "
                       f"{self._height}x{self._width} scene")
    where = Window(col, row, w, h)
    self._datasets[0].write(classes, 1, window=where)
    if len(self._datasets) > 1:
      rgb = colourise(classes, self._colours, self._nodata)
      self._datasets[1].write(np.moveaxis(rgb, -1, 0), window=where)

  def _close(self, commit: bool) -> None:
    datasets, temps = self._datasets, self._temps
    self._datasets, self._temps = [], []
    try:
      errors = []
      for dataset in datasets:  # every one, even after a failed flush (a full disk, say)
        try:
          dataset.close()
        except Exception as e:  # pylint: disable=broad-except
          errors.append(e)
      if errors and commit:  # else the block's own exception is the one to see
        raise errors[0]
      if commit:
        for (path, _), temp in zip(self._outputs, temps):
          os.replace(temp, path)
    finally:
      for temp in temps:  # after a commit only GDAL's sidecars of the temporaries are left
        files.discard(temp, _GDAL_SIDECARS)

  def __exit__(self, exc_type, exc, tb) -> None:
    self._close(commit=exc_type is None)


def write_prediction(index_path: str | os.PathLike,
                     colour_path: str | os.PathLike | None,
                     classes: np.ndarray, *, crs: str | CRS | None,
                     transform: Transform, colours: Sequence[Sequence[int]],
                     nodata: int | None = NODATA) -> None:
  """Writes a whole (H, W) class map as index (and colour) GeoTIFFs."""
  classes = np.asarray(classes)
  if classes.ndim != 2:
    raise ValueError(f"predictions: class map must be (H, W), got shape "
                     f"{classes.shape}")
  with PredictionWriter(index_path, colour_path, height=classes.shape[0],
                        width=classes.shape[1], crs=crs, transform=transform,
                        colours=colours, nodata=nodata) as writer:
    writer.write(classes)


def class_labels(class_names: Sequence[str]) -> list[str]:
  """'<index> <name>' for each class, or '<index>' alone where matplotlib's default font has
  no glyph for a character of the name (the reference's Chinese names, say), which would
  otherwise be drawn as a box with a warning."""
  font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
  return [f"{k} {name}" if all(font.get_char_index(ord(c)) for c in name) else str(k)
          for k, name in enumerate(class_names)]


def write_confusion_matrix_png(path: str | os.PathLike, confusion: np.ndarray,
                               class_names: Sequence[str],
                               title: str | None = None) -> None:
  """Confusion-matrix heat map, rows = truth normalised to sum 1 (recall),
  each cell annotated with its row fraction, classes labelled by class_labels;
  written atomically as PNG."""
  cm = np.asarray(confusion, np.float64)
  k = cm.shape[0]
  if cm.shape != (k, k) or len(class_names) != k:
    raise ValueError(f"predictions: confusion matrix {cm.shape} does not match "
                     f"{len(class_names)} class names")
  rows = cm.sum(axis=1, keepdims=True)
  fraction = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)

  size = 2.0 + 0.6 * k
  fig = Figure(figsize=(size + 1.5, size))
  FigureCanvasAgg(fig)  # pyplot-free, so no global backend state is touched
  ax = fig.add_subplot()
  image = ax.imshow(fraction, vmin=0.0, vmax=1.0, cmap="Blues")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  labels = class_labels(class_names)
  ax.set_xticks(range(k), labels=labels, rotation=45, ha="right")
  ax.set_yticks(range(k), labels=labels)
  ax.set_xlabel("prediction")
  ax.set_ylabel("truth")
  if title:
    ax.set_title(title)
  if k <= 30:  # beyond that the numbers no longer fit their cells
    for t in range(k):
      for p in range(k):
        ax.text(p, t, f"{fraction[t, p]:.2f}", ha="center", va="center",
                fontsize=8,
                color="white" if fraction[t, p] > 0.5 else "black")
  fig.tight_layout()
  with files.atomic_path(path) as temp:
    fig.savefig(temp, format="png", dpi=100)
