"""Image augmentations on the host, in numpy (float32, HWC).

Every function takes an explicit `np.random.Generator` (Grain's per-record
generator in the pipelines) or already-drawn parameters, so a pipeline is
deterministic for a seed. Images are float32 `(H, W, C)` in raw value units
(0..`value_max`, 255 for uint8 data) until `normalise`. The probabilities and
ranges of the reference are the defaults of the config dataclasses in
`glc_jax.data.recipes`; the reference used OpenCV, whose conventions are kept
where they matter (half-pixel-centre bilinear resize, OpenCV's 8-bit HSV
units, OpenCV's default Gaussian sigma, reflect-101 borders).

Speed notes (measured, see docs/pipelines.md): numpy broadcasts whose inner
axis is the 3-5 bands are ~20x slower than contiguous ones, so the separable
resampler works on `(H, W*C)` rows; and glibc returning freed memory to the
OS makes each large temporary page-fault again, which `tune_allocator` stops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import math

import numpy as np

# ---------------------------------------------------------------------------
# Allocator.

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator() -> bool:
  """Keeps freed image-sized buffers in the process heap (glibc only).

  Without this every ~1 MB temporary is mmapped or trimmed and page-faults on
  reuse, which made a 224x224x4 resize 6x slower on the development machine.
  Called in each data worker; a no-op returning False off glibc.
  """
  name = ctypes.util.find_library("c")
  if name is None:
    return False
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  ok = mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
  ok &= mallopt(_M_TRIM_THRESHOLD, 512 * 1024 * 1024)
  return bool(ok)


# ---------------------------------------------------------------------------
# Geometry: resampling, flips and rotations.


def linear_taps(coords: np.ndarray, size: int, *, outside_zero: bool):
  """Bilinear taps for 1-D source coordinates (pixel centres at integers).

  Args:
    coords: (N,) float source coordinates of the output samples.
    size: source length along this axis.
    outside_zero: True pads the source with zeros beyond its ends (OpenCV
      BORDER_CONSTANT 0; indices then refer to a source padded by one pixel
      on each side); False clamps to the edge pixels (BORDER_REPLICATE).

  Returns:
    i0, i1: (N,) int source indices; w: (N,) float32 weight of i1.
  """
  if outside_zero:
    c = np.clip(coords + 1.0, 0.0, size + 1.0)
    hi = size + 1
  else:
    c = np.clip(coords, 0.0, size - 1.0)
    hi = size - 1
  i0 = np.floor(c).astype(np.intp)
  w = (c - i0).astype(np.float32)
  i1 = np.minimum(i0 + 1, hi)
  return i0, i1, w


def resample_separable(image: np.ndarray, ys: np.ndarray, xs: np.ndarray, *,
                       outside_zero: bool = False,
                       affine: tuple[np.ndarray, np.ndarray] | None = None,
                       out: np.ndarray | None = None) -> np.ndarray:
  """Bilinear resampling on a separable (axis-aligned) grid.

  Args:
    image: (H, W, C) array of any real dtype.
    ys: (Ho,) float source row of each output row (pixel centres at integers).
    xs: (Wo,) float source column of each output column.
    outside_zero: zeros outside the image instead of edge replication.
    affine: optional per-band (scale, offset), (C,) each, applied to the
      result; folded into the smaller intermediate (bilinear weights sum to
      1, so it commutes with the row pass). Not with outside_zero.
    out: optional contiguous (Ho, Wo, C) float32 array to write into.

  Returns:
    (Ho, Wo, C) float32 (`out` when given).
  """
  h, w, c = image.shape
  if outside_zero:
    image = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  r0, r1, wy = linear_taps(ys, h, outside_zero=outside_zero)
  c0, c1, wx = linear_taps(xs, w, outside_zero=outside_zero)
  # Columns first: rows are then gathered from a contiguous (rows, Wo*C) array.
  # The weights (and the affine) are folded into two multiplies that also
  # cast the source dtype to float32, saving three passes over the data.
  w1 = np.repeat(wx, c)[None, :]
  w0 = 1.0 - w1
  if affine is not None:
    scale = np.tile(np.asarray(affine[0], np.float32), len(xs))[None, :]
    w0 *= scale
    w1 *= scale
  a = np.multiply(np.take(image, c0, axis=1).reshape(image.shape[0], -1), w0,
                  dtype=np.float32)
  b = np.multiply(np.take(image, c1, axis=1).reshape(image.shape[0], -1), w1,
                  dtype=np.float32)
  a += b
  if affine is not None:
    a += np.tile(np.asarray(affine[1], np.float32), len(xs))[None, :]
  top = np.take(a, r0, axis=0)
  bottom = np.take(a, r1, axis=0)
  np.subtract(bottom, top, out=bottom)
  np.multiply(bottom, wy[:, None], out=bottom)
  if out is None:
    np.add(top, bottom, out=top)
    return top.reshape(len(ys), len(xs), c)
  np.add(top, bottom, out=out.reshape(len(ys), len(xs) * c))
  return out


def resize_coords(start: int, length: int, out: int) -> np.ndarray:
  """Source coordinates of `out` half-pixel-centred samples over a crop.

  The crop is source pixels `start .. start+length-1`; OpenCV's INTER_LINEAR
  convention: output pixel i samples `start + (i + 0.5) * length / out - 0.5`.
  Returns (out,) float64.
  """
  return start + (np.arange(out) + 0.5) * (length / out) - 0.5


def nearest_source_index(start: int, length: int, out: int,
                         idx: np.ndarray | None = None) -> np.ndarray:
  """Source pixel nearest to each output pixel's sample point (exact integers).

  The sample point of output pixel i lies in source pixel
  `start + floor((i + 0.5) * length / out)`, computed in integer arithmetic
  so that there is no floating-point tie-breaking. Returns int64 array.
  """
  i = np.arange(out) if idx is None else np.asarray(idx)
  return start + ((2 * i + 1) * length) // (2 * out)


def resized_crop(image: np.ndarray, box, out_hw, affine=None,
                 out=None) -> np.ndarray:
  """Crops `box` = (y0, x0, h, w) and resizes it bilinearly to `out_hw`.

  Edge pixels of the crop are replicated, as when cropping then resizing.
  `affine` = per-band (scale, offset) applied to the result (normalisation);
  `out` = optional (out_h, out_w, C) float32 array to write into.
  Returns (out_h, out_w, C) float32.
  """
  y0, x0, h, w = box
  sub = image[y0:y0 + h, x0:x0 + w]
  return resample_separable(sub, resize_coords(0, h, out_hw[0]),
                            resize_coords(0, w, out_hw[1]), affine=affine,
                            out=out)


def orient(image: np.ndarray, flip: int, k: int) -> np.ndarray:
  """Flip then rotate clockwise by k*90 degrees (a view, no copy).

  flip: 0 none, 1 left-right, 2 up-down, 3 both (= a 180-degree rotation).
  Works on (H, W, ...) arrays; `glc_jax.data.patches.orient_points` is the
  same map on pixel coordinates.
  """
  if flip & 1:
    image = image[:, ::-1]
  if flip & 2:
    image = image[::-1]
  return np.rot90(image, k, axes=(1, 0))


def random_flip_code(rng: np.random.Generator, probs) -> int:
  """Draws a flip code (0 none, 1 lr, 2 ud, 3 both) with `probs` (4 floats)."""
  return min(int(np.searchsorted(np.cumsum(probs), rng.random(), side="right")),
             3)


def random_resized_crop_box(rng: np.random.Generator, hw, scale, ratio,
                            swap_p: float, attempts: int):
  """Random crop box as the reference draws it for its resized crops.

  Area fraction ~ U(scale), aspect w/h ~ U(ratio), w and h swapped with
  probability `swap_p`; the box must fit strictly inside the image (the
  reference's test), else retried up to `attempts` times and then a centred
  crop of the last size clipped to the image.

  Returns:
    (y0, x0, h, w) ints.
  """
  height, width = hw
  area = height * width
  h = w = 0
  for _ in range(attempts):
    target = rng.uniform(*scale) * area
    aspect = rng.uniform(*ratio)
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if rng.random() < swap_p:
      w, h = h, w
    if 0 < w < width and 0 < h < height:
      return (int(rng.integers(0, height - h + 1)),
              int(rng.integers(0, width - w + 1)), h, w)
  h, w = max(1, min(h, height)), max(1, min(w, width))
  return (height - h) // 2, (width - w) // 2, h, w


def random_crop_offset(rng: np.random.Generator, hw, crop_hw):
  """Uniform top-left corner of a `crop_hw` window inside `hw` (inclusive)."""
  if crop_hw[0] > hw[0] or crop_hw[1] > hw[1]:
    raise ValueError(f"crop {tuple(crop_hw)} is larger than the image {tuple(hw)}")
  return (int(rng.integers(0, hw[0] - crop_hw[0] + 1)),
          int(rng.integers(0, hw[1] - crop_hw[1] + 1)))


# ---------------------------------------------------------------------------
# Photometric ops (float32 in value units 0..value_max, modified in place
# where the name says so).


def rgb_to_hsv(r: np.ndarray, g: np.ndarray, b: np.ndarray):
  """RGB planes (float32) -> hue in sextants [0, 6), saturation [0, 1], value.

  Branch-free (selections are multiplications by boolean masks): np.where,
  masked ufuncs and float modulo are 20-50x slower than plain arithmetic on
  random masks in numpy.
  """
  v = np.maximum(np.maximum(r, g), b)
  d = v - np.minimum(np.minimum(r, g), b)
  # Where d == 0 every numerator below is 0 too, so the hue is 0.
  safe_d = np.maximum(d, np.float32(1e-20))
  s = d / np.maximum(v, np.float32(1e-20))
  is_r = v == r
  is_g = (v == g) & ~is_r
  h = r - g
  h /= safe_d
  h += 4.0
  t = b - r
  t /= safe_d
  t += 2.0
  t -= h
  t *= is_g
  h += t
  np.subtract(g, b, out=t)
  t /= safe_d
  t -= h
  t *= is_r
  h += t
  h += (h < 0) * np.float32(6.0)
  return h, s, v


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray, out: np.ndarray):
  """Inverse of `rgb_to_hsv` (h in sextants [0, 6)); writes out[..., 0:3]."""
  vs = v * s
  k = np.empty_like(h)
  t = np.empty_like(h)
  for channel, n in enumerate((5.0, 3.0, 1.0)):
    np.add(h, n, out=k)
    k -= (k >= 6.0) * np.float32(6.0)
    np.subtract(4.0, k, out=t)
    np.minimum(k, t, out=k)
    np.clip(k, 0.0, 1.0, out=k)
    k *= vs
    np.subtract(v, k, out=out[..., channel])
  return out


def hsv_shift_(image: np.ndarray, hue_deg: float, sat: float, val: float,
               value_max: float) -> np.ndarray:
  """Shifts hue (degrees, cyclic), saturation and value of bands 0..2 in place.

  Args:
    image: (H, W, C >= 3) float32 in 0..value_max.
    hue_deg: hue rotation in degrees.
    sat, val: shifts in OpenCV's 8-bit units (0..255 for both), which is how
      the reference states its limits; `val` scales with `value_max`.
  """
  r, g, b = (np.ascontiguousarray(image[..., i]) for i in range(3))
  h, s, v = rgb_to_hsv(r, g, b)
  h += np.float32((hue_deg / 60.0) % 6.0)
  h -= (h >= 6.0) * np.float32(6.0)
  s += np.float32(sat / 255.0)
  np.clip(s, 0.0, 1.0, out=s)
  v += np.float32(val * (value_max / 255.0))
  np.clip(v, 0.0, value_max, out=v)
  hsv_to_rgb(h, s, v, image)
  return image


def brightness_contrast_factors(rng: np.random.Generator, bands: int,
                                brightness: float, contrast: float,
                                value_max: float):
  """Per-band affine `x * gain + bias` of the reference's colour jitter.

  Brightness b ~ U(1-brightness, 1+brightness) blends towards white
  (b > 1: weight b-1 on value_max) or black (b <= 1), then contrast
  c ~ U(1-contrast, 1+contrast) scales. Returns gain, bias: (bands,) float32.
  """
  b = rng.uniform(max(0.0, 1.0 - brightness), 1.0 + brightness, bands)
  c = rng.uniform(max(0.0, 1.0 - contrast), 1.0 + contrast, bands)
  alpha = np.abs(b - 1.0)
  gain = (1.0 - alpha) * c
  bias = np.where(b > 1.0, alpha * value_max, 0.0) * c
  return gain.astype(np.float32), bias.astype(np.float32)


def affine_bands_(image: np.ndarray, gain: np.ndarray, bias: np.ndarray,
                  value_max: float, bands=None) -> np.ndarray:
  """In place: `image[..., bands] = clip(image * gain + bias, 0, value_max)`."""
  if bands is None or len(bands) == image.shape[-1]:
    flat = image.reshape(image.shape[0], -1)
    np.multiply(flat, np.tile(gain, image.shape[1])[None], out=flat)
    np.add(flat, np.tile(bias, image.shape[1])[None], out=flat)
    np.clip(flat, 0.0, value_max, out=flat)
    return image
  for i, band in enumerate(bands):
    x = image[..., band]
    image[..., band] = np.clip(x * gain[i] + bias[i], 0.0, value_max)
  return image


def pixel_noise_(rng: np.random.Generator, image: np.ndarray, p: float,
                 value_max: float, bands=None) -> np.ndarray:
  """In place: each (pixel, band) value becomes U{0..value_max} with prob p.

  Drawn sparsely (a binomial count, then distinct positions) because p is
  ~1e-3: a dense uniform field per image would cost more than the rest.
  """
  h, w, c = image.shape
  sel = np.arange(c) if bands is None else np.asarray(bands)
  n = h * w * len(sel)
  count = int(rng.binomial(n, p))
  if count == 0:
    return image
  flat_pos = rng.choice(n, size=count, replace=False)
  pix, which = np.divmod(flat_pos, len(sel))
  values = rng.integers(0, int(value_max) + 1, size=count).astype(np.float32)
  image.reshape(h * w, c)[pix, sel[which]] = values
  return image


def grayscale_(image: np.ndarray, band: int) -> np.ndarray:
  """In place: every band becomes a copy of `band` (the reference's gray)."""
  plane = image[..., band].copy()
  for c in range(image.shape[-1]):
    image[..., c] = plane
  return image


def gaussian_kernel(ksize: int, sigma: float = 0.0) -> np.ndarray:
  """1-D Gaussian taps; sigma <= 0 uses OpenCV's rule 0.3((k-1)/2-1)+0.8."""
  if sigma <= 0:
    sigma = 0.3 * ((ksize - 1) * 0.5 - 1.0) + 0.8
  t = np.arange(ksize) - (ksize - 1) / 2.0
  g = np.exp(-(t * t) / (2.0 * sigma * sigma))
  return (g / g.sum()).astype(np.float32)


def _reflect101_index(n: int, r: int) -> np.ndarray:
  """Indices of a length-n axis padded by r on each side, reflect-101."""
  return np.concatenate(
      [np.arange(r, 0, -1), np.arange(n), np.arange(n - 2, n - 2 - r, -1)])


def _symmetric_taps(padded: np.ndarray, g: np.ndarray, n: int, step: int,
                    tmp: np.ndarray) -> np.ndarray:
  """sum_i g[i] * padded[i*step : i*step + n] along axis 1 (pairs share a mul)."""
  k = len(g)
  r = k // 2
  out = padded[:, r * step:r * step + n] * g[r]
  for i in range(r):
    np.add(padded[:, i * step:i * step + n],
           padded[:, (k - 1 - i) * step:(k - 1 - i) * step + n], out=tmp)
    tmp *= g[i]
    out += tmp
  return out


def gaussian_blur(image: np.ndarray, ksize: int) -> np.ndarray:
  """Separable Gaussian blur with reflect-101 borders (OpenCV's default).

  Args:
    image: (H, W, C) float32. ksize: odd kernel size.
  Returns:
    (H, W, C) float32 (a new array).
  """
  h, w, c = image.shape
  g = gaussian_kernel(ksize)
  r = ksize // 2
  # Rows pass on the transposed problem: (W*C, H + 2r) would be strided, so
  # instead treat rows as columns of a (1, (H + 2r) * W*C) line.
  rows = np.take(image, _reflect101_index(h, r), axis=0)
  line = rows.reshape(1, -1)
  tmp = np.empty((1, h * w * c), np.float32)
  out = _symmetric_taps(line, g, h * w * c, w * c, tmp).reshape(h, w, c)
  cols = np.take(out, _reflect101_index(w, r), axis=1).reshape(h, -1)
  tmp = np.empty((h, w * c), np.float32)
  return _symmetric_taps(cols, g, w * c, c, tmp).reshape(h, w, c)


# ---------------------------------------------------------------------------
# Normalisation.


NORM_MODES = ("reference", "stats")


def normaliser(mode: str, bands: int, mean=None, std=None):
  """Per-band (scale, offset) so that normalised = x * scale + offset.

  mode 'reference': x/255*3.2-1.6 for every band (the reference's scaling);
  'stats': (x - mean) / std with the dataset's stored per-band statistics.
  """
  if mode == "reference":
    return (np.full(bands, 3.2 / 255.0, np.float32),
            np.full(bands, -1.6, np.float32))
  if mode == "stats":
    if mean is None or std is None:
      raise ValueError("normalisation 'stats' needs per-band mean and std")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if mean.shape != (bands,) or std.shape != (bands,):
      raise ValueError(f"normalisation stats have {mean.shape}/{std.shape} "
                       f"entries, the images have {bands} bands")
    if np.any(std <= 0):
      raise ValueError("normalisation std must be > 0 for every band")
    return 1.0 / std, -mean / std
  raise ValueError(f"unknown normalisation mode {mode!r} (expected one of {NORM_MODES})")


def normalise(image: np.ndarray, scale: np.ndarray, offset: np.ndarray,
              flip: int = 0, k: int = 0,
              out: np.ndarray | None = None) -> np.ndarray:
  """`orient(image, flip, k) * scale + offset` per band, as a new array.

  Args:
    image: (H, W, C) array; scale, offset: (C,) float32.
    out: optional contiguous float32 (H', W', C) array to write into.
  Returns:
    contiguous float32 (H', W', C) (`out` when given).
  """
  h, w, c = image.shape
  if flip or k:
    # Orient whole pixels as single opaque items: a strided copy of (H, W)
    # items is several times faster than one of (H, W, C) floats.
    src = np.ascontiguousarray(image, np.float32)
    pix = np.dtype((np.void, 4 * c))
    turned = orient(src.view(pix)[..., 0], flip, k)
    if out is None:
      out = np.empty(turned.shape + (c,), np.float32)
    np.copyto(out.view(pix)[..., 0], turned)
  elif out is None:
    out = np.array(image, np.float32, copy=True)
  else:
    np.copyto(out, image)
  h, w = out.shape[:2]
  flat = out.reshape(h, w * c)
  np.multiply(flat, np.tile(scale, w)[None], out=flat)
  np.add(flat, np.tile(offset, w)[None], out=flat)
  return out
