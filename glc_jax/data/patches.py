"""Matched patches between two augmented views, from the views' geometry.

A view is made from a source image by: crop box (y0, x0, h, w) -> bilinear
resize to n x n (half-pixel centres) -> flip -> clockwise rot90 by k
(`ViewGeometry`). The source pixel "under" view pixel i along an axis is the
one containing its sample point, `y0 + floor((i + 0.5) * h / n)`
(`augment.nearest_source_index`); the reference obtains the same
correspondence by pushing a map of pixel ids through the transforms with
nearest-neighbour resizing. Because crop and resize act on rows and columns
separately, the source pixels that can be patch centres in both views form a
product set rows x cols, which is what makes `sample_matched_patches`
vectorised: O(n) work per pair instead of the reference's per-pixel sets.

Box convention: (y0, x0, y1, x1) half-open, in view pixel coordinates. A patch
of size p centred on pixel c spans c - p//2 .. c - p//2 + p - 1; this covers
exactly the pixels of the reference's torchvision RoIPool box
(c - p/2, c + p/2 - 1 inclusive, spatial scale 1) for even p.
The view-2 box is the flipped/rotated image of the patch in view 2's
pre-orientation frame, so pixel (a, b) of the view-1 patch corresponds to the
rotated/flipped pixel of the view-2 patch (up to the two crops' scales).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from glc_jax.data.augment import nearest_source_index


@dataclasses.dataclass(frozen=True)
class ViewGeometry:
  """How a view was made from the source image.

  Attributes:
    box: (y0, x0, h, w) crop in source pixels.
    size: n, the square view's side after resizing.
    flip: 0 none, 1 left-right, 2 up-down, 3 both (applied before rotation).
    k: clockwise quarter turns (0..3), applied after the flip.
  """
  box: tuple[int, int, int, int]
  size: int
  flip: int = 0
  k: int = 0


def orient_points(rows, cols, n: int, flip: int, k: int):
  """Maps pixel indices through flip then k clockwise quarter turns (n x n).

  The same map as `augment.orient` applies to images: pixel (r, c) of the
  input lands at the returned (r', c') of the output.
  """
  rows = np.asarray(rows)
  cols = np.asarray(cols)
  if flip & 1:
    cols = n - 1 - cols
  if flip & 2:
    rows = n - 1 - rows
  for _ in range(k % 4):
    rows, cols = cols, n - 1 - rows
  return rows, cols


def orient_boxes(boxes: np.ndarray, n: int, flip: int, k: int) -> np.ndarray:
  """Maps (..., 4) half-open boxes through `orient_points` (exact for rot90)."""
  r0, c0 = orient_points(boxes[..., 0], boxes[..., 1], n, flip, k)
  r1, c1 = orient_points(boxes[..., 2] - 1, boxes[..., 3] - 1, n, flip, k)
  return np.stack([np.minimum(r0, r1), np.minimum(c0, c1),
                   np.maximum(r0, r1) + 1, np.maximum(c0, c1) + 1],
                  axis=-1).astype(np.int32)


def _orient_square_corners(top, left, n: int, size: int, flip: int, k: int):
  """Top-left corners of size x size boxes after `orient_points` (n x n).

  The box's far corner is at +size-1, so flipping maps top to n-size-top and
  a clockwise turn maps (top, left) to (left, n-size-top).
  Returns (m, 2) int array.
  """
  if flip & 1:
    left = n - size - left
  if flip & 2:
    top = n - size - top
  for _ in range(k % 4):
    top, left = left, n - size - top
  return np.stack([top, left], -1)


def _axis_candidates(start1, len1, start2, len2, n, patch_size, last=None):
  """Source indices usable as a patch centre in both views along one axis.

  View centres run from patch_size // 2 to `last` (default: the last whose
  patch fits). Returns (source index, view-1 index, view-2 index) arrays; the
  view index is the first view pixel that falls on the source pixel.
  """
  half = patch_size // 2
  centres = np.arange(half, (n - patch_size + half if last is None else last) + 1)
  if not len(centres):
    return centres, centres, centres
  s1 = nearest_source_index(start1, len1, n, centres)
  s2 = nearest_source_index(start2, len2, n, centres)
  lo = min(s1[0], s2[0])
  span = max(s1[-1], s2[-1]) - lo + 1
  in1 = np.zeros(span, bool)
  in2 = np.zeros(span, bool)
  in1[s1 - lo] = True
  in2[s2 - lo] = True
  src = np.flatnonzero(in1 & in2) + lo
  # s1, s2 are non-decreasing, so the first view pixel of each source pixel
  # is a left search.
  v1 = centres[np.searchsorted(s1, src, side="left")]
  v2 = centres[np.searchsorted(s2, src, side="left")]
  return src, v1, v2


OVERLAP_MODES = ("none", "reference")


def sample_matched_patches(rng: np.random.Generator, view1: ViewGeometry,
                           view2: ViewGeometry, patch_size: int,
                           patch_num: int, draws_per_patch: int = 8,
                           overlap: str = "none"):
  """Samples `patch_num` patches matched between two views of one image.

  Each patch centre is one source pixel seen in both views (uniform over all
  such pixels whose patches lie wholly inside both views), and the view-1
  patches do not overlap one another: a pixel is drawn uniformly among the
  candidates whose view-1 patch overlaps none already chosen. The draws are
  sequential rejection sampling over a pre-drawn vector of candidates (which
  is exactly uniform over the remaining set); when that vector runs out the
  remaining set is enumerated instead, so patches are only reported invalid
  when none fits.

  overlap="reference" follows the reference's rule instead (`_reference_draws`):
  later view-1 patches may overlap earlier ones, and duplicates are possible.

  Args:
    rng: random generator.
    view1, view2: the geometry of the two views (same `size`).
    patch_size: side p of the square patches, <= view size.
    patch_num: P, patches per pair.
    draws_per_patch: size of the pre-drawn candidate vector per patch.
    overlap: "none" (ours) or "reference".

  Returns:
    boxes1, boxes2: (P, 4) int32 half-open (y0, x0, y1, x1) in each view.
    centres: (P, 2) int32 source pixel (row, col) of each patch centre.
    valid: (P,) bool; invalid rows hold the box (0, 0, p, p) and centre (0, 0).
  """
  n = view1.size
  if view2.size != n:
    raise ValueError(f"views differ in size: {view1.size} vs {view2.size}")
  if not 0 < patch_size <= n:
    raise ValueError(f"patch_size {patch_size} must be in 1..{n}")
  if overlap not in OVERLAP_MODES:
    raise ValueError(f"patch overlap mode {overlap!r}; expected one of {OVERLAP_MODES}")
  # The reference's centres stop one short of the last that fits for even sizes.
  last = n - patch_size // 2 - 1 if overlap == "reference" else None
  rs, r1, r2 = _axis_candidates(view1.box[0], view1.box[2], view2.box[0],
                                view2.box[2], n, patch_size, last)
  cs, c1, c2 = _axis_candidates(view1.box[1], view1.box[3], view2.box[1],
                                view2.box[3], n, patch_size, last)
  chosen_a = np.zeros(patch_num, np.intp)
  chosen_b = np.zeros(patch_num, np.intp)
  boxes1 = np.tile(np.array([0, 0, patch_size, patch_size], np.int32),
                   (patch_num, 1))
  boxes2 = boxes1.copy()
  centres = np.zeros((patch_num, 2), np.int32)
  valid = np.zeros(patch_num, bool)
  if not (len(rs) and len(cs)):
    return boxes1, boxes2, centres, valid
  if overlap == "reference":
    chosen_a, chosen_b = _reference_draws(rng, view1, rs, r1, cs, c1, patch_size, patch_num)
    return _patch_boxes(chosen_a, chosen_b, rs, r1, r2, cs, c1, c2, n, patch_size, view2,
                        boxes1, boxes2, centres, valid)
  k = draws_per_patch * patch_num
  a = rng.integers(0, len(rs), k)
  b = rng.integers(0, len(cs), k)
  ya, xb = r1[a], c1[b]
  # conflict[i, j]: the view-1 patches centred at draws i and j overlap.
  conflict = ((np.abs(ya[:, None] - ya[None, :]) < patch_size)
              & (np.abs(xb[:, None] - xb[None, :]) < patch_size))
  blocked = np.zeros(k, bool)
  count = 0
  while count < patch_num:
    j = int(np.argmin(blocked))
    if blocked[j]:
      break
    chosen_a[count], chosen_b[count] = a[j], b[j]
    blocked |= conflict[j]
    count += 1
  while count < patch_num:
    # Pre-drawn candidates exhausted: enumerate what is left.
    row_hit = np.abs(r1[:, None] - r1[chosen_a[:count]][None, :]) < patch_size
    col_hit = np.abs(c1[:, None] - c1[chosen_b[:count]][None, :]) < patch_size
    hit = np.einsum("ap,bp->ab", row_hit.astype(np.int32),
                    col_hit.astype(np.int32)) > 0
    free = np.flatnonzero(~hit)
    if not len(free):
      break
    pick = free[rng.integers(0, len(free))]
    chosen_a[count], chosen_b[count] = np.divmod(pick, len(cs))
    count += 1
  return _patch_boxes(chosen_a[:count], chosen_b[:count], rs, r1, r2, cs, c1, c2, n,
                      patch_size, view2, boxes1, boxes2, centres, valid)


def _reference_draws(rng, view1, rs, r1, cs, c1, patch_size, patch_num):
  """The reference's sequential rule on the candidate grid rs x cs.

  Each patch takes a candidate uniformly (index `rng.integers(count)` into the
  live candidates in source raster order); then the candidates whose source
  pixel lies under the chosen view-1 patch, rows and columns [c - p//2, c + p//2)
  of view 1, leave the set, unless at most one would remain, in which case
  the set is kept whole. Only centres leave: a later patch may overlap an
  earlier one, and the fallback allows duplicates.
  Returns (patch_num,) candidate indices into rs and cs.
  """
  half = patch_size // 2
  live = np.ones((len(rs), len(cs)), bool)
  chosen = np.zeros(patch_num, np.intp)
  for i in range(patch_num):
    chosen[i] = np.flatnonzero(live)[rng.integers(0, np.count_nonzero(live))]
    a, b = np.divmod(chosen[i], len(cs))
    # Source indices are monotone in view pixels, so the source pixels under a
    # run of view pixels are the range between its ends' sources.
    rows = nearest_source_index(view1.box[0], view1.box[2], view1.size,
                                np.array([r1[a] - half, r1[a] + half - 1]))
    cols = nearest_source_index(view1.box[1], view1.box[3], view1.size,
                                np.array([c1[b] - half, c1[b] + half - 1]))
    under = np.outer((rs >= rows[0]) & (rs <= rows[1]), (cs >= cols[0]) & (cs <= cols[1]))
    rest = live & ~under
    if np.count_nonzero(rest) > 1:
      live = rest
  return np.divmod(chosen, len(cs))


def _patch_boxes(sa, sb, rs, r1, r2, cs, c1, c2, n, patch_size, view2,
                 boxes1, boxes2, centres, valid):
  """Fills the first len(sa) rows of the outputs for candidates (rs[sa], cs[sb])."""
  count = len(sa)
  half = patch_size // 2
  boxes1[:count, 0] = r1[sa] - half
  boxes1[:count, 1] = c1[sb] - half
  boxes1[:count, 2:] = boxes1[:count, :2] + patch_size
  boxes2[:count, :2] = _orient_square_corners(
      r2[sa] - half, c2[sb] - half, n, patch_size, view2.flip, view2.k)
  boxes2[:count, 2:] = boxes2[:count, :2] + patch_size
  centres[:count, 0] = rs[sa]
  centres[:count, 1] = cs[sb]
  valid[:count] = True
  return boxes1, boxes2, centres, valid
