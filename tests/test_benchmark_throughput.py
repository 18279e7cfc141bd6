"""The throughput report's bookkeeping: device counts, peaks, FLOPs scaled to the global step."""
import math

import jax
import pytest

from glc_jax.benchmark import throughput


def test_device_counts_are_powers_of_two_and_all():
  assert throughput.device_counts(8, []) == [1, 2, 4, 8]
  assert throughput.device_counts(6, []) == [1, 2, 4, 6]
  assert throughput.device_counts(1, []) == [1]
  assert throughput.device_counts(8, ["4", "1"]) == [1, 4]
  with pytest.raises(ValueError, match="1..8"):
    throughput.device_counts(8, ["16"])


class _Device:
  def __init__(self, kind):
    self.device_kind = kind


def test_peaks_by_device_kind_and_override():
  assert throughput.device_peak_tflops(_Device("NVIDIA H100 80GB HBM3")) == 989.0
  assert throughput.device_peak_tflops(_Device("NVIDIA H200")) == 989.0
  assert throughput.device_peak_tflops(_Device("NVIDIA A100-SXM4-80GB")) == 312.0
  assert throughput.device_peak_tflops(_Device("cpu")) is None
  assert throughput.device_peak_tflops(_Device("cpu"), override=1.5) == 1.5


@pytest.mark.slow
def test_flops_per_pair_do_not_depend_on_the_device_count():
  # The traced shard_map body is one device's share; the report multiplies by
  # the device count. The same global batch of 4 pairs must cost the same
  # total on 1 device as on 4 (gathered negatives: local rows × all columns).
  assert jax.local_device_count() >= 4
  per_device = {}
  for n in (1, 4):
    step, state, batch, rng, global_batch = throughput.build_step("simclr", "tiny", n, "float32",
                                                                  4 // n, shapes_only=True)
    per_device[n] = throughput.step_flops(step, state, batch, rng, n) / global_batch
  assert per_device[1] > 0
  # Each device repeats the few scalar ops after a metric's cross-device sum
  # (the collapse signals: ~100 FLOPs per step); a miscounted share is off by O(1).
  assert math.isclose(per_device[1], per_device[4], rel_tol=1e-6)
