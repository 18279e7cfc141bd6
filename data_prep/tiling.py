"""Reading one chunk of tile windows from a scene: the unit of work of a worker process."""
from __future__ import annotations

import dataclasses

import numpy as np
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioError
from rasterio.transform import Affine
from rasterio.windows import Window

from data_prep.class_maps import IGNORE_INDEX, ClassMap
from data_prep.errors import DataPrepError
from data_prep.scenes import Scene, open_raster
from data_prep.stats import BandStatsAccumulator


@dataclasses.dataclass(frozen=True)
class TileOptions:
  """How tiles are read and filtered (the same for every chunk of a conversion)."""
  max_nodata_fraction: float = 0.5   # skip a tile whose nodata share exceeds this
  class_map: ClassMap | None = None  # needed for colour labels
  num_classes: int | None = None     # index labels: values must be below this (or 255)
  unknown_to_ignore: bool = False


@dataclasses.dataclass(frozen=True)
class TileJob:
  scene: Scene
  windows: np.ndarray  # (N, 4) int64 (row, col, height, width)


@dataclasses.dataclass
class TileChunk:
  """What a worker sends back: kept records plus statistics of their pixels."""
  records: list[dict]
  stats: BandStatsAccumulator
  class_counts: np.ndarray  # (256,) int64 pixels per label value; [255] = ignore
  num_skipped: int
  num_nonfinite: int        # pixels of kept tiles with NaN/±Inf in some band (filled)
  num_finite: int           # pixels of all windows read, kept or not, finite in every band


def nonfinite_fill(nodata: float | None) -> float:
  """The value NaN/±Inf pixels get in written tiles: the scene's nodata value if it
  is finite, else 0 (a float model input must never be NaN)."""
  return float(nodata) if nodata is not None and np.isfinite(nodata) else 0.0


def _valid_mask(src, window: Window, image: np.ndarray, nodata: float | None) -> np.ndarray | None:
  """(H, W) bool, True where at least one band holds data; None when all pixels do.

  Nodata comes from the nodata value, else from an internal/sidecar mask (a pixel
  with a non-finite band is nodata too: the caller adds that). A band
  that GDAL calls alpha is treated as data: 4-band RGBIR GeoTIFFs (ISPRS Potsdam's
  among them) are often written with the infrared band flagged as alpha.
  """
  if nodata is not None:
    if np.isnan(nodata):
      invalid = np.isnan(image)
    else:
      invalid = image == np.asarray(nodata).astype(image.dtype)
    return ~invalid.all(axis=-1)
  flags = {f for band_flags in src.mask_flag_enums for f in band_flags}
  if MaskFlags.per_dataset not in flags or MaskFlags.alpha in flags:
    return None
  return src.dataset_mask(window=window) > 0


def _read_label(job_scene: Scene, lsrc, window: Window, origin, options: TileOptions) -> np.ndarray:
  if job_scene.label_bands == 1:
    raw = lsrc.read(1, window=window)
    label = np.full(raw.shape, IGNORE_INDEX, np.uint8)
    valid = raw != lsrc.nodata if lsrc.nodata is not None else np.ones(raw.shape, bool)
    valid &= raw != IGNORE_INDEX
    if options.num_classes is not None:
      bad = valid & ((raw < 0) | (raw >= options.num_classes))
    else:
      bad = valid & ((raw < 0) | (raw >= IGNORE_INDEX))
    if bad.any():
      row, col = (int(v) for v in np.argwhere(bad)[0])
      limit = options.num_classes if options.num_classes is not None else IGNORE_INDEX
      raise DataPrepError(
          f"{job_scene.label_path}: label value {raw[row, col]} at pixel (row {row + origin[0]}, "
          f"col {col + origin[1]}) is not a class index below {limit} or the ignore index {IGNORE_INDEX}")
    label[valid] = raw[valid]
    return label
  if options.class_map is None:
    raise DataPrepError(f"{job_scene.label_path}: colour label needs a class map (--class-map)")
  rgb = lsrc.read((1, 2, 3), window=window)
  return options.class_map.colours_to_indices(
      rgb, unknown_to_ignore=options.unknown_to_ignore, source=job_scene.label_path, origin=origin)


def _root_reason(error: BaseException) -> str:
  """First line of the innermost cause: GDAL's own words, not rasterio's wrapper."""
  while error.__cause__ or error.__context__:
    error = error.__cause__ or error.__context__
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_chunk(job: TileJob, options: TileOptions) -> TileChunk:
  """Reads the job's windows; images come back as (tile, tile, bands) arrays.

  Raises DataPrepError naming the file if a read fails (e.g. a truncated TIFF).
  """
  scene = job.scene
  stats = BandStatsAccumulator(scene.bands, scene.dtype)
  class_counts = np.zeros(256, np.int64)
  records, skipped, nonfinite, finite_pixels = [], 0, 0, 0
  fill = np.float32(nonfinite_fill(scene.nodata))
  current = scene.image_path
  try:
    with open_raster(scene.image_path) as src:
      lsrc = None
      if scene.label_path:
        current = scene.label_path
        lsrc = open_raster(scene.label_path)
      try:
        for row, col, height, width in job.windows.tolist():
          window = Window(col, row, width, height)
          current = scene.image_path
          image = np.moveaxis(src.read(window=window), 0, -1)
          valid = _valid_mask(src, window, image, scene.nodata)
          finite = np.isfinite(image).all(axis=-1) if image.dtype.kind == "f" else None
          if finite is not None and not finite.all():
            valid = finite if valid is None else valid & finite
          finite_pixels += height * width if finite is None else int(finite.sum())
          if valid is not None and 1.0 - valid.mean() > options.max_nodata_fraction:
            skipped += 1
            continue
          if finite is not None and not finite.all():
            nonfinite += int((~finite).sum())
            image = np.where(np.isfinite(image), image, fill)
          record = {
              "image": np.ascontiguousarray(image),
              "scene_id": scene.scene_id,
              "window": np.array([row, col, height, width], np.int64),
              "transform": np.array(tuple(src.transform @ Affine.translation(col, row))[:6], np.float64),
              "crs": scene.crs,
          }
          stats.add(image.reshape(-1, scene.bands) if valid is None else image[valid])
          if lsrc is not None:
            current = scene.label_path
            label = _read_label(scene, lsrc, window, (row, col), options)
            if valid is not None:
              label[~valid] = IGNORE_INDEX
            counts = np.bincount(label.ravel(), minlength=256)
            class_counts += counts
            record["label"] = label
          records.append(record)
      finally:
        if lsrc is not None:
          lsrc.close()
  except (RasterioError, OSError) as e:
    raise DataPrepError(f"{current}: read failed, file may be truncated or corrupt "
                        f"({_root_reason(e)})") from None
  return TileChunk(records, stats, class_counts, skipped, nonfinite, finite_pixels)
