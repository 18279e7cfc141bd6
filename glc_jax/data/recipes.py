"""Per-method input recipes: one record -> one training/eval example (numpy).

A recipe is a frozen config dataclass plus a function
`example(record, rng) -> dict of numpy arrays`; the pipelines batch these
into the batch contract of the brief (`glc_jax.data.pipelines`). Records
are dicts with `image` (H, W, C) uint8|uint16|float32 and, for labelled
data, `label` (H, W) uint8 with 255 = ignore. Defaults are the reference's
(GeoX-Lab/G-RSIM, T-SS-GLCNet) augmentations and probabilities.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from glc_jax.data import augment as aug
from glc_jax.data.patches import ViewGeometry, sample_matched_patches

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """Normalisation: 'reference' (x/255*3.2-1.6) or 'stats' ((x-mean)/std).

  mean/std: per-band, in raw value units (e.g. the dataset's stored band
  statistics); required for 'stats'.
  """
  mode: str = "reference"
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class ResizedCropConfig:
  """Random resized crop (the reference's, with its strict-fit retries)."""
  scale: tuple[float, float] = (0.4, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  swap_p: float = 0.5
  attempts: int = 5


@dataclasses.dataclass(frozen=True)
class ColourConfig:
  """Colour augmentation.

  Applied with probability `p`: an HSV shift of bands 0..2 (if >= 3 bands)
  with probability `hsv_p`, hue ~ U(+-hue_deg) degrees (the reference's +-30
  is in OpenCV's half-degree units), saturation ~ U(+-sat) and value ~
  U(+-val) in OpenCV 8-bit units (0..255); and, unless the image has exactly
  3 bands, per-band brightness/contrast jitter (+-brightness, +-contrast) and
  pixel noise (each value replaced with probability noise_p) on all bands.
  """
  p: float = 0.8
  hsv_p: float = 0.5
  hue_deg: float = 60.0
  sat: float = 5.0
  val: float = 15.0
  brightness: float = 0.1
  contrast: float = 0.1
  noise_p: float = 0.001


@dataclasses.dataclass(frozen=True)
class ViewAugConfig:
  """Augmentation of one view after its resized crop.

  flip_probs: probabilities of (none, left-right, up-down, both).
  rot_p: probability of a clockwise rot90 by k ~ U{0..3}.
  """
  flip_probs: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
  rot_p: float = 0.8
  colour: ColourConfig = ColourConfig()
  gray_p: float = 0.1
  blur_p: float = 0.5
  blur_sizes: tuple[int, ...] = (3, 5, 7)


NO_VIEW_AUG = ViewAugConfig(flip_probs=(1.0, 0.0, 0.0, 0.0), rot_p=0.0,
                            colour=ColourConfig(p=0.0), gray_p=0.0, blur_p=0.0)


@dataclasses.dataclass(frozen=True)
class TwoViewConfig:
  """Two views of a tile (GLCNet, SimCLR, MoCo v2); patches for GLCNet.

  tile_crop: a random tile_crop x tile_crop window is taken first when the
  tile is larger. view_size: side of both views. value_max: the value range
  that colour ops assume (255 for uint8 data). patch_num = 0 disables patch
  sampling (SimCLR, MoCo v2). patch_overlap: "none" (ours: view-1 patches
  never overlap) or "reference" (its centres-only rule, see
  `patches.sample_matched_patches`).
  """
  tile_crop: int = 256
  view_size: int = 224
  crop: ResizedCropConfig = ResizedCropConfig()
  view1: ViewAugConfig = NO_VIEW_AUG
  view2: ViewAugConfig = ViewAugConfig()
  patch_size: int = 48
  patch_num: int = 4
  patch_overlap: str = "none"
  value_max: float = 255.0
  norm: NormConfig = NormConfig()


@dataclasses.dataclass(frozen=True)
class WarpConfig:
  """Shift/scale/aspect warp (fractions), applied with probability p."""
  p: float = 0.5
  shift: float = 0.1
  scale: float = 0.1
  aspect: float = 0.1


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The reference's fine-tuning augmentation (image + label).

  Flip as `flip_probs`, rot90 with probability rot_p (1: always), random
  crop_size crop, warp, HSV shift (hsv_p) on bands 0..2 and per-band
  jitter + pixel noise on the other bands (all bands if fewer than 3);
  label pixels from outside the image become 255.

  label_warp: how the warp moves labels: "nearest" (ours: nearest
  neighbour, pixels from outside the image ignored) or "reference"
  (bilinear like the image, outside = 0, rounded to the nearest integer as
  OpenCV's uint8 warp does: borders train as class 0, and a pixel between
  classes 1 and 5 becomes 3).
  """
  crop_size: int = 256
  flip_probs: tuple[float, float, float, float] = (0.4, 0.2, 0.2, 0.2)
  rot_p: float = 1.0
  warp: WarpConfig = WarpConfig()
  hsv_p: float = 0.5
  hue_deg: float = 60.0
  sat: float = 5.0
  val: float = 15.0
  band_jitter: float = 0.01
  noise_p: float = 0.001
  label_warp: str = "nearest"
  value_max: float = 255.0
  norm: NormConfig = NormConfig()


LABEL_WARPS = ("nearest", "reference")


@dataclasses.dataclass(frozen=True)
class InpaintingConfig:
  """Tile crop + random resized crop, then `blocks` erased squares.

  masks: "example" (ours: a fresh mask per example, corners uniform over
  every position) or "epoch" (the reference's: one set of batch-size masks
  per epoch, slot i of every batch of that epoch erased by mask i, corners
  drawn as it does in 0 .. view_size - block_size - 2; `epoch_masks`).
  """
  tile_crop: int = 256
  view_size: int = 224
  crop: ResizedCropConfig = ResizedCropConfig()
  blocks: int = 16
  block_size: int = 16
  masks: str = "example"
  norm: NormConfig = NormConfig()


MASK_MODES = ("example", "epoch")


@dataclasses.dataclass(frozen=True)
class JigsawConfig:
  """3x3 puzzle: fine-tune-style augmentation of a grid*tile_size crop, then
  each tile randomly cropped to tile_crop and resized back to tile_size.

  permutations: path of an (N, grid*grid) `.npy` permutation set (e.g. the
  reference's permutations_1000.npy); "" = the generated maximal-Hamming set.
  """
  grid: int = 3
  tile_size: int = 75
  tile_crop: int = 64
  augment: FinetuneConfig = FinetuneConfig(crop_size=225)
  permutations: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Whole tiles, no augmentation."""
  norm: NormConfig = NormConfig()


def config_from_dict(cls, values: Mapping[str, Any] | None, where: str = "",
                     base: Any = None):
  """Builds config dataclass `cls` from a (nested) mapping, e.g. a ConfigDict.

  Keys override `base` (default `cls()`); a nested mapping overrides the
  nested default it replaces, so `{"augment": {"hsv_p": 0}}` keeps jigsaw's
  own augment.crop_size and `{"view1": {"gray_p": 0.1}}` keeps view 1's
  other no-augmentation settings. Unknown keys raise a one-line ValueError
  naming the key; lists become tuples.
  """
  base = cls() if base is None else base
  if values is None:
    return base
  if dataclasses.is_dataclass(values):
    return values
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in dict(values).items():
    name = f"{where}.{key}" if where else key
    if key not in fields:
      raise ValueError(f"unknown data config key {name!r} "
                       f"(known: {', '.join(sorted(fields))})")
    default = getattr(base, key)
    if dataclasses.is_dataclass(default):
      value = config_from_dict(type(default), value, name, base=default)
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return dataclasses.replace(base, **kwargs)


# ---------------------------------------------------------------------------
# Shared pieces.


def _norm_params(norm: NormConfig, bands: int):
  return aug.normaliser(norm.mode, bands, norm.mean, norm.std)


def _tile_crop(rng: np.random.Generator, image: np.ndarray, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  ch, cw = min(size, h), min(size, w)
  if (ch, cw) == (h, w):
    return image
  y, x = aug.random_crop_offset(rng, (h, w), (ch, cw))
  return image[y:y + ch, x:x + cw]


def _colour_(rng: np.random.Generator, image: np.ndarray, cfg: ColourConfig,
             value_max: float) -> None:
  """The reference's view colour augmentation, in place."""
  if rng.random() >= cfg.p:
    return
  bands = image.shape[-1]
  if bands >= 3 and rng.random() < cfg.hsv_p:
    aug.hsv_shift_(image, rng.uniform(-cfg.hue_deg, cfg.hue_deg),
                   rng.uniform(-cfg.sat, cfg.sat), rng.uniform(-cfg.val, cfg.val),
                   value_max)
  if bands != 3:
    gain, bias = aug.brightness_contrast_factors(
        rng, bands, cfg.brightness, cfg.contrast, value_max)
    aug.affine_bands_(image, gain, bias, value_max)
    aug.pixel_noise_(rng, image, cfg.noise_p, value_max)


def _view(rng: np.random.Generator, tile: np.ndarray, cfg: TwoViewConfig,
          view_cfg: ViewAugConfig, norm, out: np.ndarray | None = None
          ) -> tuple[np.ndarray, ViewGeometry]:
  """One augmented view (written into `out` if given) and its geometry."""
  c = cfg.crop
  box = aug.random_resized_crop_box(rng, tile.shape[:2], c.scale, c.ratio,
                                    c.swap_p, c.attempts)
  n = cfg.view_size
  if view_cfg == NO_VIEW_AUG:
    # Crop only (the reference's view 1): normalise inside the resize.
    return (aug.resized_crop(tile, box, (n, n), affine=norm, out=out),
            ViewGeometry(tuple(int(v) for v in box), n))
  image = aug.resized_crop(tile, box, (n, n))
  flip = aug.random_flip_code(rng, view_cfg.flip_probs)
  k = int(rng.integers(0, 4)) if rng.random() < view_cfg.rot_p else 0
  _colour_(rng, image, view_cfg.colour, cfg.value_max)
  if rng.random() < view_cfg.gray_p:
    aug.grayscale_(image, int(rng.integers(0, image.shape[-1])))
  if rng.random() < view_cfg.blur_p:
    image = aug.gaussian_blur(image, int(rng.choice(view_cfg.blur_sizes)))
  # Colour and blur (symmetric kernel, reflect-101) commute with flips and
  # quarter turns, so orienting last costs nothing beyond normalise's copy.
  view = aug.normalise(image, *norm, flip=flip, k=k, out=out)
  return view, ViewGeometry(tuple(int(v) for v in box), n, flip, k)


# ---------------------------------------------------------------------------
# Recipes.


def two_view_example(record: Mapping[str, Any], rng: np.random.Generator,
                     cfg: TwoViewConfig, out: dict | None = None
                     ) -> dict[str, np.ndarray]:
  """Two views (+ matched patches when cfg.patch_num > 0).

  `out` optionally holds arrays to write the views into (a batch's slots,
  which saves the batching copy).

  Returns:
    view1, view2: (n, n, C) float32 normalised.
    With patches: patch_boxes1, patch_boxes2 (P, 4) int32 half-open
    (y0, x0, y1, x1) in each view; patch_valid (P,) bool.
  """
  image = np.asarray(record["image"])
  norm = _norm_params(cfg.norm, image.shape[-1])
  tile = _tile_crop(rng, image, cfg.tile_crop)
  out = out or {}
  view1, geo1 = _view(rng, tile, cfg, cfg.view1, norm, out.get("view1"))
  view2, geo2 = _view(rng, tile, cfg, cfg.view2, norm, out.get("view2"))
  out = {"view1": view1, "view2": view2}
  if cfg.patch_num > 0:
    boxes1, boxes2, _, valid = sample_matched_patches(
        rng, geo1, geo2, cfg.patch_size, cfg.patch_num, overlap=cfg.patch_overlap)
    out.update(patch_boxes1=boxes1, patch_boxes2=boxes2, patch_valid=valid)
  return out


def _warp_coords(rng: np.random.Generator, size: int, shift: float,
                 scale: float, aspect: float):
  """Source coordinates of the reference's shift/scale/aspect warp (square)."""
  s = rng.uniform(1.0 - scale, 1.0 + scale)
  a = rng.uniform(1.0 - aspect, 1.0 + aspect)
  sx, sy = s * math.sqrt(a), s / math.sqrt(a)
  dx = round(rng.uniform(-shift, shift) * size)
  dy = round(rng.uniform(-shift, shift) * size)
  centre = size / 2.0
  out = np.arange(size, dtype=np.float64)
  ys = (out - centre - dy) / sy + centre
  xs = (out - centre - dx) / sx + centre
  return ys, xs


def finetune_example(record: Mapping[str, Any], rng: np.random.Generator,
                     cfg: FinetuneConfig, with_label: bool = True
                     ) -> dict[str, np.ndarray]:
  """The reference's fine-tuning augmentation of (image, label).

  Returns:
    image: (S, S, C) float32 normalised; label: (S, S) int32, 255 = ignore
    (S = crop_size, or the tile size if smaller).
  """
  image = np.asarray(record["image"])
  norm = _norm_params(cfg.norm, image.shape[-1])
  label = np.asarray(record["label"]) if with_label else None
  h, w = image.shape[:2]
  s = min(cfg.crop_size, h, w)
  y, x = aug.random_crop_offset(rng, (h, w), (s, s))
  image = image[y:y + s, x:x + s]
  flip = aug.random_flip_code(rng, cfg.flip_probs)
  k = int(rng.integers(0, 4)) if rng.random() < cfg.rot_p else 0
  if label is not None:
    label = label[y:y + s, x:x + s].astype(np.int32)
  if rng.random() < cfg.warp.p:
    ys, xs = _warp_coords(rng, s, cfg.warp.shift, cfg.warp.scale,
                          cfg.warp.aspect)
    image = aug.resample_separable(image, ys, xs, outside_zero=True)
    if label is not None and cfg.label_warp == "reference":
      warped = aug.resample_separable(label[..., None], ys, xs, outside_zero=True)[..., 0]
      label = np.floor(warped + 0.5).astype(np.int32)
    elif label is not None:
      ly = np.floor(ys + 0.5).astype(np.intp)
      lx = np.floor(xs + 0.5).astype(np.intp)
      inside = (ly >= 0) & (ly < s)
      inside_x = (lx >= 0) & (lx < s)
      label = label[np.clip(ly, 0, s - 1)][:, np.clip(lx, 0, s - 1)]
      label[~inside] = IGNORE_INDEX
      label[:, ~inside_x] = IGNORE_INDEX
  else:
    image = image.astype(np.float32)
  bands = image.shape[-1]
  if bands >= 3 and rng.random() < cfg.hsv_p:
    aug.hsv_shift_(image, rng.uniform(-cfg.hue_deg, cfg.hue_deg),
                   rng.uniform(-cfg.sat, cfg.sat), rng.uniform(-cfg.val, cfg.val),
                   cfg.value_max)
  extra = list(range(3, bands)) if bands >= 3 else list(range(bands))
  if extra:
    gain, bias = aug.brightness_contrast_factors(
        rng, len(extra), cfg.band_jitter, cfg.band_jitter, cfg.value_max)
    aug.affine_bands_(image, gain, bias, cfg.value_max, bands=extra)
    aug.pixel_noise_(rng, image, cfg.noise_p, cfg.value_max, bands=extra)
  out = {"image": aug.normalise(image, *norm, flip=flip, k=k)}
  if label is not None:
    out["label"] = np.ascontiguousarray(aug.orient(label, flip, k))
  return out


def inpainting_example(record: Mapping[str, Any], rng: np.random.Generator,
                       cfg: InpaintingConfig) -> dict[str, np.ndarray]:
  """A resized crop and its erase mask.

  Returns:
    image: (n, n, C) float32 normalised, NOT erased (the step erases);
    mask: (n, n) bool, True on the `blocks` erased squares (may overlap).
  """
  image = np.asarray(record["image"])
  norm = _norm_params(cfg.norm, image.shape[-1])
  tile = _tile_crop(rng, image, cfg.tile_crop)
  c = cfg.crop
  box = aug.random_resized_crop_box(rng, tile.shape[:2], c.scale, c.ratio,
                                    c.swap_p, c.attempts)
  n, b = cfg.view_size, cfg.block_size
  view = aug.resized_crop(tile, box, (n, n), affine=norm)
  if cfg.masks == "epoch":
    return {"image": view}
  return {"image": view, "mask": _erase_mask(rng, n, cfg.blocks, b, n - b + 1)}


def _erase_mask(rng: np.random.Generator, n: int, blocks: int, size: int,
                corner_end: int) -> np.ndarray:
  """(n, n) bool, True on `blocks` size×size squares, corners in [0, corner_end)."""
  corners = rng.integers(0, corner_end, size=(blocks, 2))
  rows = np.zeros((blocks, n), bool)
  cols = np.zeros((blocks, n), bool)
  span = np.arange(size)
  rows[np.arange(blocks)[:, None], corners[:, :1] + span] = True
  cols[np.arange(blocks)[:, None], corners[:, 1:] + span] = True
  return np.einsum("ki,kj->ij", rows.astype(np.int32), cols.astype(np.int32)) > 0


def epoch_masks(rng: np.random.Generator, batch_size: int, cfg: InpaintingConfig
                ) -> dict[str, np.ndarray]:
  """The reference's masks of one epoch: {"mask": (batch_size, n, n) bool}."""
  n, b = cfg.view_size, cfg.block_size
  return {"mask": np.stack([_erase_mask(rng, n, cfg.blocks, b, n - b - 1)
                            for _ in range(batch_size)])}


def jigsaw_example(record: Mapping[str, Any], rng: np.random.Generator,
                   cfg: JigsawConfig, permutations: np.ndarray
                   ) -> dict[str, np.ndarray]:
  """Shuffled grid tiles and the index of the permutation used.

  Args:
    permutations: (N, grid*grid) int array, each row a permutation.
  Returns:
    tiles: (grid*grid, t, t, C) float32 normalised, tiles[i] = tile
    perm[i] of the grid in row-major order; perm_index: () int32.
  """
  g, t = cfg.grid, cfg.tile_size
  base = finetune_example(record, rng, cfg.augment, with_label=False)["image"]
  if base.shape[0] < g * t:
    raise ValueError(f"jigsaw needs {g * t}-pixel crops (grid {g} × tile_size {t}) but "
                     f"gets {base.shape[0]} (the smaller of augment.crop_size "
                     f"{cfg.augment.crop_size} and the {min(record['image'].shape[:2])}-pixel "
                     "tiles): lower tile_size or use larger tiles")
  tiles = []
  for r in range(g):
    for c in range(g):
      cell = base[r * t:(r + 1) * t, c * t:(c + 1) * t]
      y, x = aug.random_crop_offset(rng, (t, t), (cfg.tile_crop, cfg.tile_crop))
      tiles.append(aug.resized_crop(cell, (y, x, cfg.tile_crop, cfg.tile_crop),
                                    (t, t)))
  index = int(rng.integers(0, len(permutations)))
  order = np.asarray(permutations[index])
  return {"tiles": np.stack([tiles[i] for i in order]),
          "perm_index": np.int32(index)}


def eval_example(record: Mapping[str, Any], cfg: EvalConfig
                 ) -> dict[str, np.ndarray]:
  """A whole tile, normalised; label as int32 (255 = ignore)."""
  image = np.asarray(record["image"])
  out = {"image": aug.normalise(image.astype(np.float32),
                                *_norm_params(cfg.norm, image.shape[-1]))}
  if "label" in record:
    out["label"] = np.asarray(record["label"]).astype(np.int32)
  return out
