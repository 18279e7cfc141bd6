"""The tiny GLCNet and fine-tuning train steps cross-compile for a TPU slice.

libtpu compiles for TPUs on a host without any (glc_jax/benchmark/aot.py), so a
change that breaks TPU lowering fails here, in CI, before anyone reaches a TPU.
The checks use expectations computed apart from XLA: argument bytes from the
shapes of the state and of one chip's share of the batch, the donated state
aliased to the output, and XLA's FLOP count next to glc_jax/flops.py's 2·MACs
count of the same traced step.
"""
import math

import jax
import pytest

try:
  import libtpu  # noqa: F401  pylint: disable=unused-import
except ImportError as e:
  pytest.skip(f"libtpu cannot be imported ({e}); pip install -e '.[aot]' to cross-compile "
              "for TPUs", allow_module_level=True)

from glc_jax import parallel  # noqa: E402
from glc_jax.benchmark import aot  # noqa: E402

TOPOLOGY = "v5e:2x2"
PER_CHIP = 2
# Smaller than the ',tiny' configs: TPU compile time grows with the op count
# and the stem's weight-gradient window, and CI compiles two steps.
TINY = {"model": {"depth": 18, "width": 0.25}}
VIEWS = {"input": {"view_size": 64, "patch_size": 16}}
CROP = {"input": {"crop_size": 64}}


def _logical_bytes(tree) -> int:
  return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def mesh():
  devices = aot.topology_devices(TOPOLOGY)
  assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
  return parallel.make_data_mesh(devices)


@pytest.mark.slow
@pytest.mark.parametrize("method, overrides", [("glcnet", dict(TINY, **VIEWS)),
                                               ("finetune", dict(TINY, **CROP))])
def test_step_compiles_for_tpu(mesh, method, overrides):
  step = aot.build_step(method, mesh, size="tiny", dtype="bfloat16", conv_impl="plain",
                        batch_per_chip=PER_CHIP, overrides=overrides)
  _, compiled, *_ = aot.compile_step(step)
  state, batch, _ = step.args
  state_bytes = _logical_bytes(state)
  batch_bytes_per_chip = _logical_bytes(batch) // mesh.size
  memory = compiled.memory_analysis()
  # TPU layouts pad small dimensions to tiles, so XLA's sizes are at least the logical ones.
  assert memory.argument_size_in_bytes >= state_bytes + batch_bytes_per_chip
  assert memory.alias_size_in_bytes >= state_bytes  # the donated state is updated in place
  assert memory.output_size_in_bytes >= state_bytes
  assert memory.temp_size_in_bytes > 0
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
  assert total < aot.HBM_GIB["v5e"] * 2 ** 30
  xla = aot.xla_flops(compiled)
  macs = aot.analytic_flops(step)
  # XLA also counts elementwise work; a step that lost its backward pass
  # (a third of the FLOPs) or computed it twice would fall outside.
  assert xla is not None and 0.6 * macs < xla < 1.5 * macs, (xla, macs)
