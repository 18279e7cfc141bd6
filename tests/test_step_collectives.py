"""The collectives of the train step, read from its lowered program (nothing compiles).

Gradients of replicated parameters and the backward pass of synchronised
BatchNorm are summed over devices; in a bfloat16 step those sums must see the
float32 values, not their bfloat16 casts (on 256 chips a bfloat16 sum keeps
about 3 significant digits). The AOT report's byte count of each collective
(glc_jax/benchmark/aot.py, docs/scaling.md) is checked here against the
shapes the step gathers.
"""
import re

import pytest

from glc_jax.benchmark import throughput

_ALL_REDUCE = re.compile(r"= \(?([a-z0-9]+)\[[0-9,]*\][^ ]* all-reduce\(")
EMBED_DIM, PATCHES = 64, 4


@pytest.fixture(scope="module")
def lowered_bf16_glcnet(devices):
  step, state, batch, rng, global_batch = throughput.build_step(
      "glcnet", "tiny", len(devices), "bfloat16", 1, shapes_only=True, conv_impl="plain")
  assert batch["patch_valid"].shape == (global_batch, PATCHES)
  return step.lower(state, batch, rng), global_batch


def test_bfloat16_step_sums_across_devices_in_float32(lowered_bf16_glcnet):
  lowered, _ = lowered_bf16_glcnet
  dtypes = _ALL_REDUCE.findall(lowered.compiler_ir(dialect="hlo").as_hlo_text())
  assert len(dtypes) > 100  # every parameter's gradient, the BatchNorm statistics, the losses
  assert "bf16" not in dtypes, f"{dtypes.count('bf16')} of {len(dtypes)} all-reduces in bfloat16"


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


def test_compiled_collective_bytes_counts_combined_tuples():
  """XLA combines gradient all-reduces into tuples; HLO text marks every sixth element with an
  /*index=N*/ comment, and the whole tuple must still count."""
  from glc_jax.benchmark import aot  # pylint: disable=import-outside-toplevel
  hlo = "\n".join([
      "  %all-reduce.529 = (f32[16]{0:T(128)}, f32[16]{0:T(128)}, f32[7,7,4,16]{3,2,1,0}, "
      "f32[16]{0}, f32[16]{0}, /*index=5*/f32[16]{0}, bf16[8]{0}) all-reduce(%a, %b, %c, %d, %e, "
      "%f, %g), replica_groups={{0,1,2,3}}, to_apply=%add",
      "  %ag-start = (f32[4]{0}, f32[16]{0}) all-gather-start(%x), dimensions={0}",
      "  %ag-done = f32[16]{0} all-gather-done(%ag-start)",
  ])
  assert aot.compiled_collective_bytes(hlo) == {
      "all-reduce": 4 * (16 * 5 + 7 * 7 * 4 * 16) + 2 * 8, "all-gather": 4 * 16}
