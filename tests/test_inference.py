"""Sliding-window inference vs the direct whole-image output and a numpy
oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glc_jax import inference

RNG = np.random.default_rng(0)
W_PIXEL = RNG.normal(size=(3, 5)).astype(np.float32)
B_PIXEL = RNG.normal(size=(5,)).astype(np.float32)


def pixel_logits(x):
  """A per-pixel model: the same linear map at every pixel."""
  return x @ W_PIXEL + B_PIXEL


def position_logits_np(x):
  """A model whose output depends on the position inside the window, so
  overlapping windows disagree and the averaging shows.

  (N, h, w, 3) -> (N, h, w, 2).
  """
  _, h, w, _ = x.shape
  i = np.arange(h, dtype=np.float32)[:, None]
  j = np.arange(w, dtype=np.float32)[None, :]
  pos = 0.1 * i - 0.2 * j + 0.01 * i * j
  return np.stack([x[..., 0] + pos, x[..., 1] * x[..., 2] - pos], axis=-1)


def position_logits_jnp(x):
  _, h, w, _ = x.shape
  i = jnp.arange(h, dtype=jnp.float32)[:, None]
  j = jnp.arange(w, dtype=jnp.float32)[None, :]
  pos = 0.1 * i - 0.2 * j + 0.01 * i * j
  return jnp.stack([x[..., 0] + pos, x[..., 1] * x[..., 2] - pos], axis=-1)


def oracle(image, row_starts, col_starts, crop, pad_value=0.0):
  """Average of position_logits over the given windows, pixel by pixel."""
  h, w, _ = image.shape
  ph, pw = max(h, crop[0]), max(w, crop[1])
  padded = np.full((ph, pw, image.shape[2]), pad_value, np.float32)
  padded[:h, :w] = image
  sums = np.zeros((ph, pw, 2))
  counts = np.zeros((ph, pw, 1))
  for y in row_starts:
    for x in col_starts:
      win = padded[None, y:y + crop[0], x:x + crop[1]]
      sums[y:y + crop[0], x:x + crop[1]] += position_logits_np(win)[0]
      counts[y:y + crop[0], x:x + crop[1]] += 1
  assert counts.min() >= 1, "oracle windows must cover the image"
  return (sums / counts)[:h, :w]


@pytest.mark.parametrize("size,crop,stride,expected", [
    (256, 256, 128, [0]),
    (512, 256, 128, [0, 128, 256]),
    (600, 256, 128, [0, 128, 256, 344]),
    (100, 256, 128, [0]),
    (70, 32, 16, [0, 16, 32, 38]),
    (45, 32, 16, [0, 13]),
    (45, 24, 12, [0, 12, 21]),
])
def test_window_starts_by_hand(size, crop, stride, expected):
  assert inference.window_starts(size, crop, stride) == expected


def test_window_starts_cover_every_pixel_within_bounds():
  for size in range(1, 90):
    for crop, stride in [(16, 16), (16, 5), (16, 1), (7, 3)]:
      starts = inference.window_starts(size, crop, stride)
      covered = np.zeros(max(size, crop), bool)
      for s in starts:
        covered[s:s + crop] = True
      assert covered[:size].all()
      assert 0 <= min(starts) and max(starts) + crop <= max(size, crop)
      assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("shape", [(70, 45, 3), (20, 50, 3), (10, 12, 3)])
def test_per_pixel_model_equals_direct_output(shape):
  image = RNG.normal(size=shape).astype(np.float32)
  got = inference.sliding_window_logits(
      image, jax.jit(pixel_logits), crop=32, stride=16, batch_size=4)
  np.testing.assert_allclose(got, pixel_logits(image), rtol=1e-5, atol=1e-5)


def test_overlap_averaging_matches_oracle():
  image = RNG.normal(size=(70, 45, 3)).astype(np.float32)
  got = inference.sliding_window_logits(
      image, jax.jit(position_logits_jnp), crop=32, stride=16, batch_size=3)
  want = oracle(image, [0, 16, 32, 38], [0, 13], (32, 32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rectangular_crop_and_small_scene_padding_match_oracle():
  image = RNG.normal(size=(20, 45, 3)).astype(np.float32)
  got = inference.sliding_window_logits(
      image, jax.jit(position_logits_jnp), crop=(32, 24), stride=(16, 12),
      batch_size=2, pad_value=-1.6)
  # Height 20 < 32: one window on the padded image; width 45 as hand-listed.
  want = oracle(image, [0], [0, 12, 21], (32, 24), pad_value=-1.6)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_many_images_share_batches_and_compile_once():
  traces = []

  def model(x):
    traces.append(x.shape)
    return position_logits_jnp(x)

  apply_fn = jax.jit(model)
  images = [RNG.normal(size=s).astype(np.float32)
            for s in [(70, 45, 3), (20, 50, 3), (32, 32, 3), (33, 40, 3)]]
  got = list(inference.iter_sliding_window_logits(
      images, apply_fn, crop=32, stride=16, batch_size=5))
  assert traces == [(5, 32, 32, 3)]
  assert [g.shape for g in got] == [im.shape[:2] + (2,) for im in images]
  starts = [([0, 16, 32, 38], [0, 13]), ([0], [0, 16, 18]), ([0], [0]),
            ([0, 1], [0, 8])]
  for image, logits, (rows, cols) in zip(images, got, starts):
    np.testing.assert_allclose(logits, oracle(image, rows, cols, (32, 32)),
                               rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise_clear_errors():
  image = np.zeros((40, 40, 3), np.float32)
  with pytest.raises(ValueError, match="stride .* larger than crop"):
    inference.sliding_window_logits(image, pixel_logits, crop=16, stride=17)
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    inference.sliding_window_logits(image[..., 0], pixel_logits, crop=16,
                                    stride=8)
  with pytest.raises(ValueError, match="apply_fn returned shape"):
    inference.sliding_window_logits(
        image, lambda x: x[:, ::2, ::2] @ W_PIXEL, crop=16, stride=8)
  with pytest.raises(ValueError, match="bands"):
    list(inference.iter_sliding_window_logits(
        [image, np.zeros((40, 40, 4), np.float32)], pixel_logits, crop=16,
        stride=8))
