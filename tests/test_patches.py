"""Matched-patch geometry against brute-force pixel-id oracles."""
import numpy as np
import pytest

from glc_jax.data import augment
from glc_jax.data.patches import (ViewGeometry, orient_boxes, orient_points,
                                  sample_matched_patches)


@pytest.mark.parametrize("flip", range(4))
@pytest.mark.parametrize("k", range(4))
def test_orient_points_matches_image_orientation(flip, k):
  n = 7
  ids = np.arange(n * n).reshape(n, n)
  turned = augment.orient(ids, flip, k)
  r, c = np.divmod(ids, n)
  r2, c2 = orient_points(r, c, n, flip, k)
  assert np.array_equal(turned[r2, c2], ids)


@pytest.mark.parametrize("flip", range(4))
@pytest.mark.parametrize("k", range(4))
def test_orient_boxes_covers_the_turned_pixels(flip, k):
  n = 9
  box = np.array([1, 2, 4, 7])
  mask = np.zeros((n, n), bool)
  mask[1:4, 2:7] = True
  y0, x0, y1, x1 = orient_boxes(box, n, flip, k)
  expected = np.zeros((n, n), bool)
  expected[y0:y1, x0:x1] = True
  assert np.array_equal(augment.orient(mask, flip, k), expected)


def _id_view(geo: ViewGeometry, src_w: int):
  """Source pixel id under each view pixel: independent float oracle."""
  y0, x0, h, w = geo.box
  rows = y0 + np.floor((np.arange(geo.size) + 0.5) * h / geo.size).astype(int)
  cols = x0 + np.floor((np.arange(geo.size) + 0.5) * w / geo.size).astype(int)
  return augment.orient(rows[:, None] * src_w + cols[None, :], geo.flip, geo.k)


def _random_geometries(rng, n, src):
  box = lambda: augment.random_resized_crop_box(
      rng, (src, src), (0.3, 1.0), (0.75, 4 / 3), 0.5, 5)
  return (ViewGeometry(box(), n),
          ViewGeometry(box(), n, int(rng.integers(4)), int(rng.integers(4))))


@pytest.mark.parametrize("patch_size", [4, 7, 8])
def test_sampled_patches_match_oracle(patch_size):
  rng = np.random.default_rng(patch_size)
  n, src = 32, 40
  for _ in range(60):
    g1, g2 = _random_geometries(rng, n, src)
    b1, b2, centres, valid = sample_matched_patches(rng, g1, g2, patch_size, 4)
    ids1, ids2 = _id_view(g1, src), _id_view(g2, src)
    half = patch_size // 2
    for p in np.flatnonzero(valid):
      for b in (b1[p], b2[p]):
        assert 0 <= b[0] and 0 <= b[1] and b[2] <= n and b[3] <= n
        assert b[2] - b[0] == patch_size and b[3] - b[1] == patch_size
      centre_id = ids1[b1[p, 0] + half, b1[p, 1] + half]
      assert centre_id == centres[p, 0] * src + centres[p, 1]
      # Undo view 2's orientation on its patch: the pixel at the view-1
      # centre offset must be the same source pixel.
      patch2 = ids2[b2[p, 0]:b2[p, 2], b2[p, 1]:b2[p, 3]]
      ys, xs = np.meshgrid(np.arange(patch_size), np.arange(patch_size),
                           indexing="ij")
      ty, tx = orient_points(ys, xs, patch_size, g2.flip, g2.k)
      unturned = patch2[ty, tx]
      assert unturned[half, half] == centre_id
    # View-1 patches do not overlap.
    v = np.flatnonzero(valid)
    for i in v:
      for j in v[v > i]:
        overlap = (min(b1[i, 2], b1[j, 2]) > max(b1[i, 0], b1[j, 0])
                   and min(b1[i, 3], b1[j, 3]) > max(b1[i, 1], b1[j, 1]))
        assert not overlap


def test_all_candidates_reached_when_crowded():
  # Identical full views of a 16-pixel image with 8-pixel patches: the only
  # non-overlapping sets have centres 8 apart, at most 4 patches; exhausting
  # the pre-drawn vector must fall back to enumeration, never overlap.
  rng = np.random.default_rng(0)
  g = ViewGeometry((0, 0, 16, 16), 16)
  counts = set()
  for _ in range(50):
    b1, _, _, valid = sample_matched_patches(rng, g, g, 8, 4, draws_per_patch=1)
    counts.add(int(valid.sum()))
    boxes = b1[valid]
    occupancy = np.zeros((16, 16), int)
    for y0, x0, y1, x1 in boxes:
      occupancy[y0:y1, x0:x1] += 1
    assert occupancy.max() <= 1
  assert 4 in counts and max(counts) == 4


def test_disjoint_views_give_no_valid_patch():
  rng = np.random.default_rng(0)
  g1 = ViewGeometry((0, 0, 10, 10), 20)
  g2 = ViewGeometry((20, 20, 10, 10), 20)
  b1, b2, _, valid = sample_matched_patches(rng, g1, g2, 4, 3)
  assert not valid.any()
  assert b1.shape == b2.shape == (3, 4) and b1.dtype == np.int32
