"""Sliding-window inference over whole tiles or scenes, model-agnostic.

Windows of `crop` pixels are placed every `stride` pixels; the logits of
overlapping windows are averaged per pixel. This follows the reference's
evaluation (crop 256, stride 128, logits of overlapping windows combined per
pixel, then argmax; it sums where we average, which gives the same argmax) with
one deliberate difference at the borders: the reference zero-pads the bottom
and right edges up to the next stride multiple, so edge windows see artificial
content, whereas here the last window along an axis is shifted back to end at
the image edge, so every window holds only real pixels. Only an image smaller
than the crop is padded (bottom/right, with `pad_value`), and the padding is cut
from the result.

Windows from consecutive images share batches, so many small tiles (one window
each) still fill the accelerator, and every call of `apply_fn` has the same
shape (the last batch is padded), so a jitted model compiles once.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

ApplyFn = Callable[[np.ndarray], jax.Array | np.ndarray]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
  if isinstance(value, (int, np.integer)):
    value = (value, value)
  pair = tuple(value)
  if len(pair) != 2 or any(int(v) < 1 for v in pair):
    raise ValueError(f"sliding window: {name} must be a positive int or a "
                     f"(height, width) pair, got {value!r}")
  return int(pair[0]), int(pair[1])


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets along one axis of windows that cover [0, size).

  Starts are 0, stride, 2*stride, ... while the window fits, plus a last
  window ending exactly at `size` when the regular ones leave a remainder.
  A `size` not larger than `crop` gives the single start 0 (the caller pads).
  """
  if size <= crop:
    return [0]
  starts = list(range(0, size - crop + 1, stride))
  if starts[-1] + crop < size:
    starts.append(size - crop)
  return starts


class _Scene:
  """Logit sums and window counts of one image while its windows run."""

  def __init__(self, image: np.ndarray, crop: tuple[int, int],
               stride: tuple[int, int], pad_value: float):
    if image.ndim != 3:
      raise ValueError(f"sliding window: image must be (H, W, C), got shape "
                       f"{image.shape}")
    self.height, self.width = image.shape[:2]
    pad_h = max(crop[0] - self.height, 0)
    pad_w = max(crop[1] - self.width, 0)
    if pad_h or pad_w:
      image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)),
                     constant_values=np.asarray(pad_value, image.dtype))
    self.image = image
    self.windows = [
        (y, x)
        for y in window_starts(image.shape[0], crop[0], stride[0])
        for x in window_starts(image.shape[1], crop[1], stride[1])
    ]
    self.remaining = len(self.windows)
    self.sums: np.ndarray | None = None  # (Hp, Wp, K) float32, once K is known
    self.counts = np.zeros(image.shape[:2], np.int32)

  def add(self, y: int, x: int, logits: np.ndarray) -> None:
    h, w = logits.shape[:2]
    if self.sums is None:
      self.sums = np.zeros(self.image.shape[:2] + logits.shape[-1:], np.float32)
    self.sums[y:y + h, x:x + w] += logits
    self.counts[y:y + h, x:x + w] += 1
    self.remaining -= 1

  def result(self) -> np.ndarray:
    mean = self.sums / self.counts[..., None]
    return mean[:self.height, :self.width]


def iter_sliding_window_logits(images: Iterable[np.ndarray], apply_fn: ApplyFn,
                               *, crop: int | Sequence[int] = 256,
                               stride: int | Sequence[int] = 128,
                               batch_size: int = 8,
                               pad_value: float = 0.0) -> Iterator[np.ndarray]:
  """Sliding-window logits of each image, yielded in input order.

  Args:
    images: (H, W, C) arrays, any size (each may differ), already normalised
      as the model expects; their dtype is passed on unchanged.
    apply_fn: maps a (batch_size, crop_h, crop_w, C) batch of windows to
      (batch_size, crop_h, crop_w, K) logits; typically a jitted eval-mode
      model (its result is read back asynchronously, one batch behind).
    crop: window size, int or (height, width).
    stride: window step, int or (height, width); at most `crop`, so that
      windows leave no gaps.
    batch_size: windows per `apply_fn` call (a multiple of the device count
      when `apply_fn` shards its batch).
    pad_value: fill for images smaller than `crop` (in normalised units).

  Yields:
    (H, W, K) float32: per pixel, the mean of the logits of every window
    covering it.
  """
  crop = _pair(crop, "crop")
  stride = _pair(stride, "stride")
  if stride[0] > crop[0] or stride[1] > crop[1]:
    raise ValueError(f"sliding window: stride {stride} larger than crop {crop} "
                     f"would leave pixels uncovered")
  if batch_size < 1:
    raise ValueError(f"sliding window: batch_size must be >= 1, got "
                     f"{batch_size}")

  order: collections.deque[_Scene] = collections.deque()
  queue: list[tuple[_Scene, int, int]] = []
  in_flight: tuple[jax.Array | np.ndarray, list] | None = None

  def collect(pending) -> None:
    logits, slots = pending
    logits = np.asarray(logits, dtype=np.float32)
    expected = (batch_size, crop[0], crop[1])
    if logits.ndim != 4 or logits.shape[:3] != expected:
      raise ValueError(f"sliding window: apply_fn returned shape "
                       f"{logits.shape}, expected {expected + ('K',)}")
    for i, (scene, y, x) in enumerate(slots):
      scene.add(y, x, logits[i])

  def dispatch() -> None:
    nonlocal in_flight, queue
    slots, queue = queue, []
    windows = [s.image[y:y + crop[0], x:x + crop[1]] for s, y, x in slots]
    windows += [windows[-1]] * (batch_size - len(windows))
    logits = apply_fn(np.stack(windows))
    # The device computes this batch while the previous one is read back.
    if in_flight is not None:
      collect(in_flight)
    in_flight = (logits, slots)

  def finished() -> Iterator[np.ndarray]:
    while order and order[0].remaining == 0:
      yield order.popleft().result()

  bands = None
  for image in images:
    scene = _Scene(np.asarray(image), crop, stride, pad_value)
    bands = scene.image.shape[-1] if bands is None else bands
    if scene.image.shape[-1] != bands:
      raise ValueError(f"sliding window: image has {scene.image.shape[-1]} "
                       f"bands, earlier images had {bands}")
    order.append(scene)
    for y, x in scene.windows:
      queue.append((scene, y, x))
      if len(queue) == batch_size:
        dispatch()
    yield from finished()
  if queue:
    dispatch()
  if in_flight is not None:
    collect(in_flight)
  yield from finished()


def sliding_window_logits(image: np.ndarray, apply_fn: ApplyFn, *,
                          crop: int | Sequence[int] = 256,
                          stride: int | Sequence[int] = 128,
                          batch_size: int = 8,
                          pad_value: float = 0.0) -> np.ndarray:
  """Sliding-window logits of one (H, W, C) image: (H, W, K) float32.

  See `iter_sliding_window_logits` for the arguments.
  """
  (logits,) = iter_sliding_window_logits(
      [image], apply_fn, crop=crop, stride=stride, batch_size=batch_size,
      pad_value=pad_value)
  return logits
