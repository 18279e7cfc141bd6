"""The collectives of the train step, read from its lowered program (nothing compiles):
the AOT report's byte count of each collective (glc_jax/benchmark/aot.py,
docs/scaling.md) against the shapes the step gathers.
"""
import pytest

from glc_jax.benchmark import throughput

EMBED_DIM, PATCHES = 64, 4


@pytest.fixture(scope="module")
def lowered_bf16_glcnet(devices):
  step, state, batch, rng, global_batch = throughput.build_step(
      "glcnet", "tiny", len(devices), "bfloat16", 1, shapes_only=True, conv_impl="plain")
  assert batch["patch_valid"].shape == (global_batch, PATCHES)
  return step.lower(state, batch, rng), global_batch


def test_aot_report_counts_the_gathered_embeddings(lowered_bf16_glcnet, devices):
  from glc_jax.benchmark import aot  # pylint: disable=import-outside-toplevel
  lowered, n = lowered_bf16_glcnet
  # Global q and k (n, 64) and local q1 and k1 (n·4, 64), float32, plus the
  # validity masks of both (bool): every device receives all of them; the
  # backward pass scatters each device its share of the float cotangents.
  floats = 4 * EMBED_DIM * (2 * n + 2 * n * PATCHES)
  got = aot.lowered_collective_bytes(lowered)
  assert got["embedding all-gather"] == floats + (n + n * PATCHES)
  assert got["embedding all-gather backward (reduce-scatter)"] == floats // len(devices)
