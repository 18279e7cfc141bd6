"""Per-band pixel statistics that merge exactly across tiles, scenes and workers.

Integer images keep only a histogram (one bin per value), from which count, mean,
variance, min and max follow exactly. Float images also keep running moments,
merged with Chan et al.'s pairwise update (float64), so the result does not
depend on how pixels were split between workers. Percentiles come
from histograms: exact for uint8 and uint16 (one bin per value); for float32 one
bin per bfloat16 value (the top 16 bits of the float), so a float percentile is
the true percentile truncated towards zero to 8 significant bits (relative error
below 2**-7).
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (1.0, 2.0, 5.0, 25.0, 50.0, 75.0, 95.0, 98.0, 99.0)
_NUM_BINS = {"uint8": 256, "uint16": 65536, "float32": 65536}


def _float_bins(values: np.ndarray) -> np.ndarray:
  """Maps float32 values to 16-bit bin ids whose order matches the values' order."""
  bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
  negative = (bits >> 31).astype(bool)
  # Flip all bits of negatives and the sign bit of positives: unsigned order of
  # the result equals numeric order of the floats.
  ordered = np.where(negative, ~bits, bits | np.uint32(0x80000000))
  return (ordered >> 16).astype(np.int64)


def _float_bin_value(bin_id: int) -> float:
  """Inverse of `_float_bins`: the bin's value closest to zero."""
  ordered = bin_id << 16
  if ordered & 0x80000000:
    bits = ordered & 0x7FFFFFFF
  else:
    bits = ~(ordered | 0xFFFF) & 0xFFFFFFFF
  return float(np.array(bits, np.uint32).view(np.float32))


class BandStatsAccumulator:
  """Per-band histogram, plus running count, mean, M2, min and max for float32."""

  def __init__(self, num_bands: int, dtype: str):
    if dtype not in _NUM_BINS:
      raise ValueError(f"unsupported dtype {dtype}")
    self.dtype = dtype
    self.count = np.zeros(num_bands, np.int64)
    self.mean = np.zeros(num_bands, np.float64)
    self.m2 = np.zeros(num_bands, np.float64)
    self.min = np.full(num_bands, np.inf)
    self.max = np.full(num_bands, -np.inf)
    self.hist = np.zeros((num_bands, _NUM_BINS[dtype]), np.int64)

  def add(self, pixels: np.ndarray) -> None:
    """Adds valid pixels, shape (N, bands) in the accumulator's dtype.

    Non-finite float values are left out of every statistic.
    """
    for band in range(pixels.shape[1]):
      values = pixels[:, band]
      if self.dtype != "float32":
        self.hist[band] += np.bincount(values, minlength=self.hist.shape[1])
        continue
      values = values[np.isfinite(values)]
      if values.size == 0:
        continue
      as_float = values.astype(np.float64)
      n = as_float.size
      mean = as_float.mean()
      m2 = np.square(as_float - mean).sum()
      self._merge_moments(band, n, mean, m2)
      self.min[band] = min(self.min[band], as_float.min())
      self.max[band] = max(self.max[band], as_float.max())
      self.hist[band] += np.bincount(_float_bins(values), minlength=self.hist.shape[1])

  def _merge_moments(self, band: int, n: int, mean: float, m2: float) -> None:
    total = self.count[band] + n
    delta = mean - self.mean[band]
    self.mean[band] += delta * n / total
    self.m2[band] += m2 + delta * delta * self.count[band] * n / total
    self.count[band] = total

  def merge(self, other: BandStatsAccumulator) -> None:
    for band in range(len(self.count)):
      if other.count[band]:
        self._merge_moments(band, other.count[band], other.mean[band], other.m2[band])
    self.min = np.minimum(self.min, other.min)
    self.max = np.maximum(self.max, other.max)
    self.hist += other.hist

  def _integer_moments(self) -> None:
    """Fills count, mean, M2, min and max of integer data from the histogram."""
    values = np.arange(self.hist.shape[1], dtype=np.float64)
    self.count = self.hist.sum(axis=1)
    for band, hist in enumerate(self.hist):
      if self.count[band] == 0:
        continue
      present = np.flatnonzero(hist)
      self.mean[band] = int((hist * np.arange(len(hist), dtype=np.int64)).sum()) / self.count[band]
      self.m2[band] = (hist * np.square(values - self.mean[band])).sum()
      self.min[band], self.max[band] = present[0], present[-1]

  def percentile(self, q: float) -> np.ndarray:
    """Per-band q-th percentile (inverted-CDF rule), NaN for bands with no pixels."""
    out = np.full(len(self.hist), np.nan)
    for band, hist in enumerate(self.hist):
      total = hist.sum()
      if total == 0:
        continue
      rank = max(int(np.ceil(q / 100.0 * total)), 1)
      bin_id = int(np.searchsorted(np.cumsum(hist), rank))
      out[band] = _float_bin_value(bin_id) if self.dtype == "float32" else bin_id
    return out

  def summary(self) -> dict:
    """JSON-ready stats: lists with one value per band (population std)."""
    if self.dtype != "float32":
      self._integer_moments()
    empty = self.count == 0
    def as_list(values):
      return [None if e else float(v) for v, e in zip(values, empty)]
    std = np.sqrt(self.m2 / np.maximum(self.count, 1))
    return {
        "pixel_count": self.count.tolist(),
        "mean": as_list(self.mean),
        "std": as_list(std),
        "min": as_list(self.min),
        "max": as_list(self.max),
        "percentiles": {f"{q:g}": as_list(self.percentile(q)) for q in PERCENTILES},
    }
