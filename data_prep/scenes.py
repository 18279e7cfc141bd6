"""Finding input scenes, checking them against each other, and tiling them into windows."""
from __future__ import annotations

import dataclasses
import glob
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioError

from data_prep.errors import DataPrepError

SUPPORTED_DTYPES = ("uint8", "uint16", "float32")
_TIFF_SUFFIXES = (".tif", ".tiff")


@dataclasses.dataclass(frozen=True)
class Scene:
  """One input image (and its label), as found on disk."""
  scene_id: str            # file stem, unique within a conversion
  image_path: str
  label_path: str | None
  height: int
  width: int
  bands: int
  dtype: str
  transform: tuple[float, ...]  # affine a..f of the whole scene
  crs: str                 # "EPSG:n", WKT, or "" when the file has none
  nodata: float | None     # image nodata value (None: only GDAL masks, if any)
  label_bands: int = 0


def expand_paths(specs: str | Sequence[str], what: str) -> list[Path]:
  """Expands directories (their *.tif/*.tiff), globs, `@list.txt` files and plain paths.

  A list file holds one path per line, relative to the list file's folder.
  """
  if isinstance(specs, (str, Path)):
    specs = [specs]
  paths: list[Path] = []
  for spec in map(str, specs):
    if spec.startswith("@"):
      list_file = Path(spec[1:])
      try:
        lines = [l.strip() for l in list_file.read_text().splitlines() if l.strip()]
      except OSError as e:
        raise DataPrepError(f"{list_file}: cannot read {what} list ({e.strerror})") from None
      paths += [list_file.parent / l for l in lines]
    elif Path(spec).is_dir():
      paths += sorted(p for p in Path(spec).iterdir() if p.suffix.lower() in _TIFF_SUFFIXES)
    elif glob.has_magic(spec):
      paths += [Path(p) for p in sorted(glob.glob(spec))]
    else:
      paths.append(Path(spec))
  if not paths:
    raise DataPrepError(f"{', '.join(map(str, specs))}: no {what} GeoTIFF files found")
  for p in paths:
    if p.is_dir():
      raise DataPrepError(f"{p}: is a directory, not a GeoTIFF ({what} files must be .tif/.tiff files)")
    if not p.exists():
      raise DataPrepError(f"{p}: {what} file does not exist")
    if not p.is_file():
      raise DataPrepError(f"{p}: {what} path is not a regular file")
  return paths


def _crs_string(crs) -> str:
  if crs is None:
    return ""
  return crs.to_string()


def open_raster(path: Path | str):
  """rasterio.open without the warning for files lacking a georeference (crs is then "")."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", NotGeoreferencedWarning)
    return rasterio.open(path)


def _open(path: Path | str, what: str):
  try:
    return open_raster(path)
  except (RasterioError, OSError) as e:
    raise DataPrepError(f"{path}: cannot open {what} as a raster ({str(e).splitlines()[0]})") from None


def _same_transform(t1, t2) -> bool:
  return np.allclose(np.array(t1), np.array(t2), rtol=1e-9, atol=1e-9)


def inspect_scenes(image_paths: Sequence[Path], label_paths: Sequence[Path] | None,
                   *, tile: int, nodata: float | None = None,
                   label_stem_replace: tuple[str, str] | None = None) -> list[Scene]:
  """Reads every header and checks the corpus is consistent; raises DataPrepError if not.

  Labels are paired with images by file stem (after applying `label_stem_replace`
  (old, new) to the image stem, e.g. ("RGBIR", "label")).
  """
  stems: dict[str, Path] = {}
  for p in image_paths:
    if p.stem in stems:
      raise DataPrepError(f"{p}: scene id {p.stem!r} also used by {stems[p.stem]}; file stems must be unique")
    stems[p.stem] = p
  labels_by_stem: dict[str, Path] = {}
  for p in label_paths or ():
    if p.stem in labels_by_stem:
      raise DataPrepError(f"{p}: label stem {p.stem!r} also used by {labels_by_stem[p.stem]}")
    labels_by_stem[p.stem] = p

  scenes = []
  first: Scene | None = None
  for path in image_paths:
    with _open(path, "image") as src:
      dtypes = set(src.dtypes)
      if len(dtypes) != 1 or src.dtypes[0] not in SUPPORTED_DTYPES:
        raise DataPrepError(f"{path}: band dtypes {sorted(dtypes)}; supported are one of {SUPPORTED_DTYPES}")
      scene = Scene(scene_id=path.stem, image_path=str(path), label_path=None,
                    height=src.height, width=src.width, bands=src.count, dtype=src.dtypes[0],
                    transform=tuple(src.transform)[:6], crs=_crs_string(src.crs),
                    nodata=nodata if nodata is not None else src.nodata)
    if first is None:
      first = scene
      if nodata is not None:
        _check_nodata(nodata, scene)
    elif scene.bands != first.bands:
      raise DataPrepError(f"{path}: {scene.bands} bands, but {first.image_path} has {first.bands}")
    elif scene.dtype != first.dtype:
      raise DataPrepError(f"{path}: dtype {scene.dtype}, but {first.image_path} has {first.dtype}")
    if tile > scene.height or tile > scene.width:
      raise DataPrepError(f"{path}: scene is {scene.height}x{scene.width} pixels, smaller than tile {tile}")
    if label_paths is not None:
      stem = path.stem.replace(*label_stem_replace) if label_stem_replace else path.stem
      if stem not in labels_by_stem:
        raise DataPrepError(f"{path}: no label file with stem {stem!r} among the labels")
      scene = _with_label(scene, labels_by_stem[stem])
    scenes.append(scene)
  return scenes


def _check_nodata(nodata: float, scene: Scene) -> None:
  """Refuses a --nodata the scenes' pixel type cannot hold: cast to it, -1 would become 255 on
  uint8 and mark every white pixel as nodata."""
  if not np.issubdtype(np.dtype(scene.dtype), np.integer):
    return
  info = np.iinfo(scene.dtype)
  if not np.isfinite(nodata) or nodata != int(nodata) or not info.min <= nodata <= info.max:
    raise DataPrepError(f"{scene.image_path}: --nodata {nodata:g} is not a {scene.dtype} value "
                        f"(whole numbers {info.min}..{info.max}), so no pixel can have it")


def _with_label(scene: Scene, label_path: Path) -> Scene:
  with _open(label_path, "label") as src:
    if (src.height, src.width) != (scene.height, scene.width):
      raise DataPrepError(
          f"{label_path}: label is {src.height}x{src.width} pixels but image "
          f"{scene.image_path} is {scene.height}x{scene.width}")
    if not _same_transform(tuple(src.transform)[:6], scene.transform):
      raise DataPrepError(
          f"{label_path}: geotransform {tuple(src.transform)[:6]} differs from image "
          f"{scene.image_path} {scene.transform}")
    label_crs = _crs_string(src.crs)
    if label_crs and scene.crs and src.crs != rasterio.crs.CRS.from_user_input(scene.crs):
      raise DataPrepError(f"{label_path}: CRS {label_crs} differs from image {scene.image_path} {scene.crs}")
    if src.count not in (1, 3, 4):
      raise DataPrepError(f"{label_path}: {src.count} bands; labels are 1-band index or 3/4-band RGB(A) colour rasters")
    if src.count > 1 and src.dtypes[0] != "uint8":
      raise DataPrepError(f"{label_path}: colour label has dtype {src.dtypes[0]}, expected uint8")
    if src.count == 1 and not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
      raise DataPrepError(f"{label_path}: index label has dtype {src.dtypes[0]}, expected an integer type")
    return dataclasses.replace(scene, label_path=str(label_path), label_bands=src.count)


def tile_starts(size: int, tile: int, stride: int, keep_edge: bool) -> list[int]:
  """Start offsets along one axis; with keep_edge a last tile is flush with the far edge."""
  starts = list(range(0, size - tile + 1, stride))
  if keep_edge and starts[-1] + tile < size:
    starts.append(size - tile)
  return starts


def scene_windows(scene: Scene, tile: int, stride: int, keep_edge: bool) -> np.ndarray:
  """(N, 4) int64 windows (row, col, height, width), row-major over the scene."""
  rows = tile_starts(scene.height, tile, stride, keep_edge)
  cols = tile_starts(scene.width, tile, stride, keep_edge)
  grid = np.array([(r, c, tile, tile) for r in rows for c in cols], np.int64)
  return grid
