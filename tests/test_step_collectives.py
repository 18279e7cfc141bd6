"""The cross-device sums of a bfloat16 train step run in float32.

Gradients of replicated parameters and the backward pass of synchronised
BatchNorm are summed over devices; in a bfloat16 step those sums must see the
float32 values, not their bfloat16 casts (on 256 chips a bfloat16 sum keeps
about 3 significant digits). Checked on the lowered program, before XLA's own
rewrites, so nothing is compiled.
"""
import re

import pytest

from glc_jax.benchmark import throughput

_ALL_REDUCE = re.compile(r"= \(?([a-z0-9]+)\[[0-9,]*\][^ ]* all-reduce\(")


@pytest.mark.parametrize("method", ["glcnet"])
def test_bfloat16_step_sums_across_devices_in_float32(devices, method):
  step, state, batch, rng, _ = throughput.build_step(method, "tiny", len(devices), "bfloat16", 1,
                                                     shapes_only=True, conv_impl="plain")
  hlo = step.lower(state, batch, rng).compiler_ir(dialect="hlo").as_hlo_text()
  dtypes = _ALL_REDUCE.findall(hlo)
  assert len(dtypes) > 100  # every parameter's gradient, the BatchNorm statistics, the losses
  assert "bf16" not in dtypes, f"{dtypes.count('bf16')} of {len(dtypes)} all-reduces in bfloat16"
