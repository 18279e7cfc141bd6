"""Augmentation ops against independent oracles (scipy, colorsys, formulas)."""
import colorsys

import numpy as np
import pytest
from scipy import ndimage

from glc_jax.data import augment, recipes


def test_resized_crop_matches_scipy_bilinear():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  box, out = (3, 5, 30, 41), (24, 36)
  got = augment.resized_crop(image, box, out)
  ys = box[0] + (np.arange(out[0]) + 0.5) * box[2] / out[0] - 0.5
  xs = box[1] + (np.arange(out[1]) + 0.5) * box[3] / out[1] - 0.5
  ys = np.clip(ys, box[0], box[0] + box[2] - 1)
  xs = np.clip(xs, box[1], box[1] + box[3] - 1)
  yy, xx = np.meshgrid(ys, xs, indexing="ij")
  for c in range(3):
    want = ndimage.map_coordinates(image[..., c].astype(np.float64), [yy, xx],
                                   order=1)
    np.testing.assert_allclose(got[..., c], want, atol=1e-3)


def test_warp_zero_outside():
  image = np.full((6, 6, 1), 10.0, np.float32)
  got = augment.resample_separable(image, np.arange(-2, 8) * 1.0,
                                   np.full(3, 2.0), outside_zero=True)
  np.testing.assert_allclose(got[:, 0, 0], [0, 0, 10, 10, 10, 10, 10, 10, 0, 0])
  half = augment.resample_separable(image, np.array([-0.5, 5.5]),
                                    np.array([2.0]), outside_zero=True)
  np.testing.assert_allclose(half[:, 0, 0], [5.0, 5.0])


def test_hsv_shift_matches_colorsys():
  rng = np.random.default_rng(1)
  image = rng.uniform(0, 255, (5, 7, 4)).astype(np.float32)
  hue, sat, val = 47.0, 4.0, -12.0
  got = augment.hsv_shift_(image.copy(), hue, sat, val, 255.0)
  for y in range(5):
    for x in range(7):
      h, s, v = colorsys.rgb_to_hsv(*(image[y, x, :3] / 255.0))
      h = (h + hue / 360.0) % 1.0
      s = min(max(s + sat / 255.0, 0.0), 1.0)
      v = min(max(v + val / 255.0, 0.0), 1.0)
      np.testing.assert_allclose(got[y, x, :3],
                                 np.array(colorsys.hsv_to_rgb(h, s, v)) * 255,
                                 atol=2e-3)
  np.testing.assert_array_equal(got[..., 3], image[..., 3])


def test_gaussian_blur_matches_opencv_rule_and_reflect101():
  rng = np.random.default_rng(2)
  image = rng.uniform(0, 255, (12, 10, 2)).astype(np.float32)
  for k in (3, 5, 7):
    sigma = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
    t = np.arange(k) - k // 2
    g = np.exp(-t * t / (2 * sigma * sigma))
    g /= g.sum()
    want = ndimage.correlate1d(ndimage.correlate1d(
        image.astype(np.float64), g, axis=0, mode="mirror"), g, axis=1,
                               mode="mirror")
    np.testing.assert_allclose(augment.gaussian_blur(image, k), want, atol=1e-3)


@pytest.mark.parametrize("flip,k", [(0, 0), (1, 1), (2, 3), (3, 2)])
def test_normalise_orients_and_scales(flip, k):
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
  scale, offset = augment.normaliser("reference", 3)
  got = augment.normalise(image, scale, offset, flip=flip, k=k)
  turned = image
  if flip & 1:
    turned = turned[:, ::-1]
  if flip & 2:
    turned = turned[::-1]
  want = np.rot90(turned, k, axes=(1, 0)) / 255.0 * 3.2 - 1.6
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_normaliser_stats_and_errors():
  scale, offset = augment.normaliser("stats", 2, mean=(10, 20), std=(2, 4))
  np.testing.assert_allclose(np.array([12, 16]) * scale + offset, [1, -1])
  with pytest.raises(ValueError, match="bands"):
    augment.normaliser("stats", 3, mean=(1, 2), std=(1, 1))
  with pytest.raises(ValueError, match="unknown normalisation"):
    augment.normaliser("imagenet", 3)


def test_brightness_contrast_is_the_blend_then_scale():
  rng = np.random.default_rng(4)
  gain, bias = augment.brightness_contrast_factors(rng, 3, 0.1, 0.1, 255.0)
  rng = np.random.default_rng(4)
  b = rng.uniform(0.9, 1.1, 3)
  c = rng.uniform(0.9, 1.1, 3)
  x = np.array([0.0, 100.0, 255.0])
  for i in range(3):
    blended = (b[i] - 1) * 255 + (2 - b[i]) * x if b[i] > 1 else b[i] * x
    np.testing.assert_allclose(x * gain[i] + bias[i], blended * c[i], rtol=1e-5)


def test_pixel_noise_rate_and_range():
  rng = np.random.default_rng(5)
  image = np.full((100, 100, 4), -1.0, np.float32)
  augment.pixel_noise_(rng, image, 0.05, 255.0)
  changed = image != -1.0
  assert abs(changed.mean() - 0.05) < 5 * np.sqrt(0.05 * 0.95 / changed.size)
  assert image[changed].min() >= 0 and image[changed].max() <= 255


def test_random_resized_crop_box_fits_and_follows_area():
  rng = np.random.default_rng(6)
  areas = []
  for _ in range(300):
    y, x, h, w = augment.random_resized_crop_box(
        rng, (256, 256), (0.4, 1.0), (0.75, 4 / 3), 0.5, 5)
    assert 0 <= y and 0 <= x and y + h <= 256 and x + w <= 256
    areas.append(h * w / 256 ** 2)
  assert 0.35 <= min(areas) and max(areas) <= 1.0


def test_config_from_dict_nested_and_unknown_key():
  cfg = recipes.config_from_dict(
      recipes.TwoViewConfig, {"patch_size": 16, "view2": {"blur_p": 0.0},
                              "crop": {"scale": [0.5, 0.9]}})
  assert cfg.patch_size == 16 and cfg.view2.blur_p == 0.0
  assert cfg.crop.scale == (0.5, 0.9) and cfg.view2.rot_p == 0.8
  with pytest.raises(ValueError, match="view2.blurp"):
    recipes.config_from_dict(recipes.TwoViewConfig, {"view2": {"blurp": 0}})
