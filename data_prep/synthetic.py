"""A synthetic aerial-image corpus: the project's embedded default data.

Each scene is a rendered town block layout at ~0.2 m ground sampling distance:
a road network with sidewalks, markings and cars; blocks of houses (rectangles
and L shapes, several roof materials, gabled shading), commercial buildings with
parking lots, parks with clustered tree crowns, construction sites (clutter).
Buildings and trees cast shadows along a per-scene sun direction. Scene-level
style varies (season, illumination gain, colour cast, haze, sensor noise), so
that two scenes differ in style the way two acquisitions do: exactly what a
style-aware contrastive method is meant to be robust to.

Images are written as tiled GeoTIFFs (R, G, B, NIR by default) in UTM 33N with a
per-scene origin; labels as index rasters over the six ISPRS classes, or as
RGB colour rasters the way ISPRS distributes them.

    python -m data_prep.synthetic --out /tmp/synth --scenes 8 --size 1024
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import rasterio
from scipy import ndimage

# The six ISPRS 2D labelling classes and their standard RGB colours.
CLASS_NAMES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
CLASS_COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
IMPERVIOUS, BUILDING, LOW_VEG, TREE, CAR, CLUTTER = range(6)

# Reflectance (R, G, B, NIR) in [0, 1] of the materials a scene is rendered from.
ASPHALT = (0.17, 0.17, 0.18, 0.19)
SIDEWALK = (0.42, 0.41, 0.39, 0.40)
PAVING = (0.33, 0.32, 0.30, 0.31)
MARKING = (0.85, 0.85, 0.82, 0.80)
ROOFS = (
    (0.55, 0.24, 0.19, 0.42),  # red clay tiles
    (0.50, 0.50, 0.50, 0.47),  # concrete
    (0.14, 0.14, 0.15, 0.16),  # bitumen
    (0.72, 0.74, 0.76, 0.66),  # light metal
    (0.36, 0.27, 0.22, 0.38),  # brown tiles
)
GRASS_SUMMER = (0.12, 0.33, 0.10, 0.62)
GRASS_DRY = (0.38, 0.36, 0.22, 0.40)
TREE_SUMMER = (0.06, 0.19, 0.06, 0.55)
TREE_AUTUMN = (0.30, 0.20, 0.07, 0.42)
SOIL = (0.42, 0.33, 0.23, 0.39)
CAR_PAINTS = (
    (0.85, 0.85, 0.85), (0.06, 0.06, 0.07), (0.55, 0.56, 0.58),
    (0.60, 0.08, 0.07), (0.10, 0.18, 0.50), (0.30, 0.32, 0.34),
)

NODATA_DTYPES = {"uint8": 255.0, "uint16": 10000.0}  # full-scale DN per output dtype
DEFAULT_CRS = "EPSG:32633"


@dataclasses.dataclass(frozen=True)
class Scene:
  """A rendered scene: image (H, W, bands) float32 reflectance in [0, 1], label (H, W) uint8."""
  image: np.ndarray
  label: np.ndarray


class _Canvas:
  """Label, reflectance, height and texture layers that the painters write into."""

  def __init__(self, rng: np.random.Generator, height: int, width: int):
    self.rng = rng
    self.h, self.w = height, width
    self.label = np.full((height, width), LOW_VEG, np.uint8)
    self.refl = np.empty((height, width, 4), np.float32)
    self.elev = np.zeros((height, width), np.float32)  # object height in pixels
    self.shade = np.ones((height, width), np.float32)  # per-object shading multiplier

  def rect(self, y0, x0, y1, x1, cls, refl, elev=None):
    y0, x0 = max(int(y0), 0), max(int(x0), 0)
    y1, x1 = min(int(y1), self.h), min(int(x1), self.w)
    if y1 <= y0 or x1 <= x0:
      return None
    self.label[y0:y1, x0:x1] = cls
    self.refl[y0:y1, x0:x1] = refl
    if elev is not None:
      self.elev[y0:y1, x0:x1] = elev
    return (slice(y0, y1), slice(x0, x1))


def _noise(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
  """Smooth zero-mean unit-ish noise with features about `cell` pixels across."""
  gh, gw = int(np.ceil(shape[0] / cell)) + 3, int(np.ceil(shape[1] / cell)) + 3
  coarse = rng.standard_normal((gh, gw)).astype(np.float32)
  fine = ndimage.zoom(coarse, cell, order=3, prefilter=False)
  return fine[: shape[0], : shape[1]]


def _fractal(rng: np.random.Generator, shape: tuple[int, int], cells=(64, 16, 4)) -> np.ndarray:
  return sum(_noise(rng, shape, c) / (i + 1) for i, c in enumerate(cells))


def _road_network(cv: _Canvas) -> list[tuple[int, int, int, int]]:
  """Draws roads; returns the free blocks between them as (y0, x0, y1, x1)."""
  rng = cv.rng
  cuts = {}
  for axis, extent in (("y", cv.h), ("x", cv.w)):
    n = max(1, int(round(extent / rng.uniform(260, 380))))
    base = (np.arange(n) + 0.5) * extent / n
    pos = base + rng.uniform(-0.2, 0.2, n) * extent / n
    cuts[axis] = [(int(p), int(rng.uniform(26, 40))) for p in pos]
  for axis, roads in cuts.items():
    for centre, width in roads:
      half, walk = width // 2, int(rng.uniform(4, 7))
      if axis == "y":
        cv.rect(centre - half - walk, 0, centre + half + walk, cv.w, IMPERVIOUS, SIDEWALK)
        cv.rect(centre - half, 0, centre + half, cv.w, IMPERVIOUS, ASPHALT)
        for x in range(0, cv.w, 40):
          cv.rect(centre - 1, x, centre + 1, x + 20, IMPERVIOUS, MARKING)
      else:
        cv.rect(0, centre - half - walk, cv.h, centre + half + walk, IMPERVIOUS, SIDEWALK)
        cv.rect(0, centre - half, cv.h, centre + half, IMPERVIOUS, ASPHALT)
        for y in range(0, cv.h, 40):
          cv.rect(y, centre - 1, y + 20, centre + 1, IMPERVIOUS, MARKING)
  # Intersections are plain asphalt.
  for yc, yw in cuts["y"]:
    for xc, xw in cuts["x"]:
      cv.rect(yc - yw // 2, xc - xw // 2, yc + yw // 2, xc + xw // 2, IMPERVIOUS, ASPHALT)
  _cars_on_roads(cv, cuts)

  def spans(roads, extent):
    edges, start = [], 0
    for centre, width in sorted(roads):
      edges.append((start, centre - width // 2 - 8))
      start = centre + width // 2 + 8
    edges.append((start, extent))
    return [(a, b) for a, b in edges if b - a > 24]

  return [(y0, x0, y1, x1) for y0, y1 in spans(cuts["y"], cv.h) for x0, x1 in spans(cuts["x"], cv.w)]


def _car(cv: _Canvas, yc: int, xc: int, along_x: bool):
  rng = cv.rng
  length, width = int(rng.uniform(19, 25)), int(rng.uniform(8, 10))
  h, w = (width, length) if along_x else (length, width)
  paint = CAR_PAINTS[rng.integers(len(CAR_PAINTS))]
  refl = (*paint, float(np.mean(paint)) * 0.9 + 0.05)
  sl = cv.rect(yc - h // 2, xc - w // 2, yc - h // 2 + h, xc - w // 2 + w, CAR, refl, elev=7)
  if sl is None:
    return
  # A dark windscreen band a third of the way along the car.
  ys, xs = sl
  if along_x:
    x = xs.start + (xs.stop - xs.start) // 3
    cv.refl[ys, x : x + 3] = (0.05, 0.06, 0.07, 0.06)
  else:
    y = ys.start + (ys.stop - ys.start) // 3
    cv.refl[y : y + 3, xs] = (0.05, 0.06, 0.07, 0.06)


def _cars_on_roads(cv: _Canvas, cuts):
  rng = cv.rng
  for axis, roads in cuts.items():
    extent = cv.w if axis == "y" else cv.h
    for centre, width in roads:
      for lane in (-1, 1):
        pos = rng.uniform(0, 60)
        while pos < extent:
          offset = centre + lane * width // 4
          if axis == "y":
            _car(cv, offset, int(pos), along_x=True)
          else:
            _car(cv, int(pos), offset, along_x=False)
          pos += rng.exponential(110) + 28


def _building(cv: _Canvas, y0, x0, y1, x1):
  """A rectangular or L-shaped building with a gabled roof of a random material."""
  rng = cv.rng
  roof = np.array(ROOFS[rng.integers(len(ROOFS))], np.float32)
  roof = roof * rng.uniform(0.9, 1.1, 4).astype(np.float32)
  height = rng.uniform(25, 80)
  sl = cv.rect(y0, x0, y1, x1, BUILDING, roof, elev=height)
  if sl is None:
    return
  ys, xs = sl
  # Gable: the two roof halves face the sun differently.
  if (ys.stop - ys.start) > (xs.stop - xs.start):
    mid = (xs.start + xs.stop) // 2
    cv.shade[ys, xs.start:mid] *= 1.12
    cv.shade[ys, mid:xs.stop] *= 0.86
  else:
    mid = (ys.start + ys.stop) // 2
    cv.shade[ys.start:mid, xs] *= 1.12
    cv.shade[mid:ys.stop, xs] *= 0.86
  if rng.random() < 0.45:  # cut a corner out to make an L shape
    cy, cx = rng.integers(2), rng.integers(2)
    hh = int((ys.stop - ys.start) * rng.uniform(0.35, 0.55))
    ww = int((xs.stop - xs.start) * rng.uniform(0.35, 0.55))
    yy0 = ys.start if cy == 0 else ys.stop - hh
    xx0 = xs.start if cx == 0 else xs.stop - ww
    cv.rect(yy0, xx0, yy0 + hh, xx0 + ww, LOW_VEG, GRASS_SUMMER, elev=0)
    cv.shade[yy0:yy0 + hh, xx0:xx0 + ww] = 1.0


def _tree_cluster(cv: _Canvas, yc, xc, spread, count):
  rng = cv.rng
  for _ in range(count):
    r = rng.uniform(7, 18)
    y = yc + rng.normal(0, spread)
    x = xc + rng.normal(0, spread)
    y0, y1 = int(max(y - r, 0)), int(min(y + r + 1, cv.h))
    x0, x1 = int(max(x - r, 0)), int(min(x + r + 1, cv.w))
    if y1 <= y0 or x1 <= x0:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d = np.hypot(yy - y, xx - x) / r
    crown = (d < 1.0) & (cv.label[y0:y1, x0:x1] != BUILDING)
    cv.label[y0:y1, x0:x1][crown] = TREE
    cv.refl[y0:y1, x0:x1][crown] = TREE_SUMMER
    top = r * 2.2
    cv.elev[y0:y1, x0:x1][crown] = np.maximum(cv.elev[y0:y1, x0:x1][crown], top * np.sqrt(1 - d[crown] ** 2))
    # Dome shading: lit towards the upper left, dark rim.
    lit = 1.0 + 0.25 * ((xx - x) * -0.6 + (yy - y) * -0.8) / r - 0.25 * d**2
    cv.shade[y0:y1, x0:x1][crown] = lit[crown]


def _residential(cv, y0, x0, y1, x1):
  rng = cv.rng
  cv.rect(y0, x0, y1, x1, LOW_VEG, GRASS_SUMMER)
  lot = rng.uniform(80, 130)
  ny, nx = max(1, int((y1 - y0) / lot)), max(1, int((x1 - x0) / lot))
  ly, lx = (y1 - y0) / ny, (x1 - x0) / nx
  for i in range(ny):
    for j in range(nx):
      ay, ax = y0 + i * ly, x0 + j * lx
      fy, fx = rng.uniform(0.45, 0.7, 2)
      oy, ox = rng.uniform(0.1, 0.9 - fy) * ly, rng.uniform(0.1, 0.9 - fx) * lx
      _building(cv, ay + oy, ax + ox, ay + oy + fy * ly, ax + ox + fx * lx)
      if rng.random() < 0.5:  # a paved driveway or terrace
        cv.rect(ay + oy + fy * ly, ax + ox, ay + oy + fy * ly + 10, ax + ox + 20, IMPERVIOUS, PAVING)
      if rng.random() < 0.4:  # a garden shed, bins or a pool: clutter
        cy, cx = ay + rng.uniform(0, ly - 14), ax + rng.uniform(0, lx - 14)
        if cv.label[int(cy), int(cx)] == LOW_VEG:
          colour = rng.uniform(0.1, 0.7, 3)
          cv.rect(cy, cx, cy + rng.uniform(8, 16), cx + rng.uniform(8, 16), CLUTTER,
                  (*colour, float(colour.mean())), elev=6)
      if rng.random() < 0.8:
        _tree_cluster(cv, ay + rng.uniform(0, ly), ax + rng.uniform(0, lx), 10, int(rng.integers(1, 5)))


def _commercial(cv, y0, x0, y1, x1):
  rng = cv.rng
  cv.rect(y0, x0, y1, x1, IMPERVIOUS, PAVING)
  h, w = y1 - y0, x1 - x0
  by1 = y0 + h * rng.uniform(0.45, 0.65)
  _building(cv, y0 + 6, x0 + 6, by1, x1 - 6)
  # Parking rows below the building.
  for row_y in np.arange(by1 + 18, y1 - 10, 34):
    for cx in np.arange(x0 + 14, x1 - 14, 14):
      if rng.random() < 0.6:
        _car(cv, int(row_y), int(cx), along_x=False)
  if rng.random() < 0.7:
    _tree_cluster(cv, y1 - 8, x0 + rng.uniform(0, w), 10, int(rng.integers(2, 5)))


def _park(cv, y0, x0, y1, x1):
  rng = cv.rng
  cv.rect(y0, x0, y1, x1, LOW_VEG, GRASS_SUMMER)
  path_y = int(rng.uniform(y0, y1))
  cv.rect(path_y - 3, x0, path_y + 3, x1, IMPERVIOUS, SIDEWALK)
  area = (y1 - y0) * (x1 - x0)
  for _ in range(max(1, int(area / 9000))):
    _tree_cluster(cv, rng.uniform(y0, y1), rng.uniform(x0, x1), rng.uniform(8, 25), int(rng.integers(3, 12)))


def _construction(cv, y0, x0, y1, x1):
  rng = cv.rng
  cv.rect(y0, x0, y1, x1, CLUTTER, SOIL)
  for _ in range(int(rng.integers(3, 9))):
    cy, cx = rng.uniform(y0, y1), rng.uniform(x0, x1)
    colour = rng.uniform(0.1, 0.8, 3)
    cv.rect(cy, cx, cy + rng.uniform(8, 24), cx + rng.uniform(10, 40), CLUTTER,
            (*colour, float(colour.mean())), elev=rng.uniform(5, 15))
  if rng.random() < 0.5:
    _building(cv, y0 + 10, x0 + 10, y0 + (y1 - y0) * 0.4, x0 + (x1 - x0) * 0.5)


_BLOCKS = ((_residential, 0.45), (_commercial, 0.2), (_park, 0.2), (_construction, 0.15))


def _shadows(cv: _Canvas, azimuth: float, slope: float) -> np.ndarray:
  """Boolean mask of pixels shadowed by a taller object towards the sun."""
  dy, dx = -np.cos(azimuth), np.sin(azimuth)  # unit step towards the sun
  shadow = np.zeros((cv.h, cv.w), bool)
  step = 2
  for k in range(step, 60, step):
    oy, ox = int(round(k * dy)), int(round(k * dx))
    src = np.zeros_like(cv.elev)
    # src[p] = elev[p + k * sun direction]
    ys = slice(max(-oy, 0), cv.h - max(oy, 0))
    xs = slice(max(-ox, 0), cv.w - max(ox, 0))
    yd = slice(max(oy, 0), cv.h - max(-oy, 0))
    xd = slice(max(ox, 0), cv.w - max(-ox, 0))
    src[ys, xs] = cv.elev[yd, xd]
    shadow |= src - k * slope > cv.elev + 1.0
  return shadow


def _style(rng: np.random.Generator) -> dict:
  """Acquisition style of one scene: season, illumination, colour cast, haze, noise."""
  return {
      "season": rng.uniform(0, 1),  # 0 lush summer, 1 dry late autumn
      "gain": rng.uniform(0.75, 1.25),
      "cast": rng.uniform(0.92, 1.08, 4).astype(np.float32),
      "haze": rng.uniform(0.0, 0.06),
      "noise": rng.uniform(0.004, 0.015),
      "azimuth": rng.uniform(0, 2 * np.pi),
      "slope": rng.uniform(0.6, 1.6),  # object height per shadow pixel (sun elevation)
  }


def _spectrum(refl4: np.ndarray, bands: int) -> np.ndarray:
  """Extends (…, 4) R, G, B, NIR reflectance to `bands` bands (extra bands: red-edge-like mixes)."""
  if bands <= 4:
    return refl4[..., :bands]
  w = np.linspace(0.2, 0.8, bands - 4, dtype=np.float32)
  extra = refl4[..., :1] * (1 - w) + refl4[..., 3:4] * w
  return np.concatenate([refl4, extra], axis=-1)


def _check_scene_shape(height: int, width: int, bands: int) -> None:
  if height < 64 or width < 64:
    raise ValueError(f"scene size {height}x{width} is too small: need at least 64x64")
  if bands < 1:
    raise ValueError(f"bands must be >= 1, got {bands}")


def render_scene(seed: int, height: int = 1024, width: int = 1024, bands: int = 4) -> Scene:
  """Generates one scene, deterministic for `seed`.

  Returns reflectance (height, width, bands) float32 in [0, 1] and labels
  (height, width) uint8 in 0..5 (ISPRS class order, CLASS_NAMES).
  """
  _check_scene_shape(height, width, bands)
  rng = np.random.default_rng(seed)
  style = _style(rng)
  cv = _Canvas(rng, height, width)
  cv.refl[:] = GRASS_SUMMER
  kinds, weights = zip(*_BLOCKS)
  blocks = _road_network(cv)
  # Every block kind appears once (when there is room) so that every class is present.
  picks = list(rng.permutation(len(kinds)))
  picks += list(rng.choice(len(kinds), size=max(len(blocks) - len(picks), 0), p=weights))
  for block, pick in zip(rng.permutation(len(blocks)), picks):
    kinds[pick](cv, *blocks[block])
  # Tree clusters anywhere but on roofs: over roads, lots and yards.
  for _ in range(int(height * width / 40_000)):
    _tree_cluster(cv, rng.uniform(0, height), rng.uniform(0, width), 30, int(rng.integers(2, 6)))

  s = style["season"]
  refl = cv.refl
  grass = cv.label == LOW_VEG
  trees = cv.label == TREE
  veg_noise = _noise(rng, (height, width), 90)[..., None]
  # Season acts on vegetation, with patchy variation (dry spots, mixed species).
  mix = np.clip(s + 0.25 * veg_noise, 0, 1)
  refl[grass] = (np.float32(GRASS_SUMMER) * (1 - mix[grass]) + np.float32(GRASS_DRY) * mix[grass])
  refl[trees] = (np.float32(TREE_SUMMER) * (1 - mix[trees]) + np.float32(TREE_AUTUMN) * mix[trees])

  texture = 1.0 + 0.08 * _fractal(rng, (height, width))[..., None]
  fine = 1.0 + 0.06 * rng.standard_normal((height, width, 1)).astype(np.float32)
  veg = (grass | trees)[..., None]
  img = refl * cv.shade[..., None] * texture * np.where(veg, fine * 1.5 - 0.5, fine)
  shadow = _shadows(cv, style["azimuth"], style["slope"])
  img[shadow] *= np.float32((0.38, 0.40, 0.48, 0.42))  # skylight-lit shadows are bluish
  img = img * style["gain"] * style["cast"] + style["haze"]
  img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0), mode="nearest")  # optics blur
  img = _spectrum(img, bands)
  img = img + style["noise"] * rng.standard_normal(img.shape).astype(np.float32)
  return Scene(image=np.clip(img, 0.0, 1.0).astype(np.float32), label=cv.label)


def colour_label(label: np.ndarray) -> np.ndarray:
  """(H, W) class indices → (H, W, 3) uint8 ISPRS colours."""
  return np.asarray(CLASS_COLOURS, np.uint8)[label]


def _write_tif(path: pathlib.Path, array_hwc: np.ndarray, transform, crs: str):
  h, w, c = array_hwc.shape
  profile = dict(driver="GTiff", height=h, width=w, count=c, dtype=array_hwc.dtype.name,
                 crs=crs, transform=transform, tiled=True, blockxsize=256, blockysize=256,
                 compress="deflate", interleave="pixel")
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(np.moveaxis(array_hwc, -1, 0))


def _scene_seed(seed: int, index: int) -> int:
  return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def write_corpus(out_dir: str | os.PathLike, num_scenes: int = 4, height: int = 1024,
                 width: int = 1024, seed: int = 0, bands: int = 4, dtype: str = "uint8",
                 colour_labels: bool = False, gsd: float = 0.2, crs: str = DEFAULT_CRS,
                 progress: bool = False) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Writes `num_scenes` scenes as GeoTIFFs under out_dir/{images,labels}/scene_NNN.tif.

  Scene i depends only on (seed, i), so a corpus is byte-identical for a seed
  and its first scenes do not change when more are asked for. The directory is
  built beside out_dir and renamed into place when complete; an existing
  out_dir is an error. Returns the (image, label) path pairs.
  """
  if dtype not in NODATA_DTYPES:
    raise ValueError(f"dtype must be one of {sorted(NODATA_DTYPES)}, got {dtype!r}")
  if num_scenes < 1:
    raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}")
  _check_scene_shape(height, width, bands)  # before the progress bar starts
  out = pathlib.Path(out_dir)
  if out.exists():
    raise FileExistsError(f"{out}: already exists; remove it or choose another --out")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  umask = os.umask(0)
  os.umask(umask)
  tmp.chmod(0o777 & ~umask)  # mkdtemp's private 0700 would survive the rename
  try:
    (tmp / "images").mkdir()
    (tmp / "labels").mkdir()
    scale = NODATA_DTYPES[dtype]
    scenes = range(num_scenes)
    if progress:
      from tqdm import tqdm
      scenes = tqdm(scenes, desc="synthetic scenes", unit="scene")
    for i in scenes:
      scene = render_scene(_scene_seed(seed, i), height, width, bands)
      # Scenes sit side by side along the easting, as tiles of one survey would.
      transform = rasterio.Affine(gsd, 0.0, 368_000.0 + i * (width + 64) * gsd, 0.0, -gsd, 5_808_000.0)
      image = np.round(scene.image * scale).astype(dtype)
      label = colour_label(scene.label) if colour_labels else scene.label[..., None]
      _write_tif(tmp / "images" / f"scene_{i:03d}.tif", image, transform, crs)
      _write_tif(tmp / "labels" / f"scene_{i:03d}.tif", label, transform, crs)
    _write_class_dict(tmp / "class_dict.csv")
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  names = [f"scene_{i:03d}.tif" for i in range(num_scenes)]
  return [(out / "images" / n, out / "labels" / n) for n in names]


def _write_class_dict(path: pathlib.Path):
  lines = ["name,r,g,b"] + [f"{n},{r},{g},{b}" for n, (r, g, b) in zip(CLASS_NAMES, CLASS_COLOURS)]
  path.write_text("\n".join(lines) + "\n")


def save_preview(scene: Scene, path: str | os.PathLike):
  """Writes a PNG of a scene: true colour | NIR-R-G false colour | label colours."""
  import matplotlib.pyplot as plt

  bands = scene.image.shape[-1]
  # Fewer than three bands: the first as grey.
  rgb = scene.image[..., :3] if bands >= 3 else np.repeat(scene.image[..., :1], 3, axis=-1)
  false_colour = scene.image[..., [3, 0, 1]] if bands >= 4 else rgb
  panels = [np.clip(rgb * 1.3, 0, 1), np.clip(false_colour * 1.3, 0, 1),
            colour_label(scene.label).astype(np.float32) / 255]
  gap = np.ones((scene.label.shape[0], 8, 3), np.float32)
  plt.imsave(path, np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_prep.synthetic", description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--scenes", type=int, default=4, help="number of scenes")
  parser.add_argument("--size", type=int, default=1024, help="scene height and width in pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--bands", type=int, default=4, help="R, G, B, NIR, then red-edge-like mixes")
  parser.add_argument("--dtype", choices=sorted(NODATA_DTYPES), default="uint8")
  parser.add_argument("--colour-labels", action="store_true", help="write RGB colour labels (ISPRS style)")
  parser.add_argument("--preview", help="also write a PNG of the first scene (RGB | NIR false colour | label)")
  args = parser.parse_args(argv)
  try:
    write_corpus(args.out, args.scenes, args.size, args.size, args.seed, args.bands, args.dtype,
                 args.colour_labels, progress=True)
  except (ValueError, FileExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.preview:
    save_preview(render_scene(_scene_seed(args.seed, 0), args.size, args.size, args.bands), args.preview)
  print(f"wrote {args.scenes} scenes to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
