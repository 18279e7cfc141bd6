"""Train-step throughput per method: pairs/s, step time, GFLOP per pair, MFU, memory.

    python -m glc_jax.benchmark.throughput --size=tiny --out=throughput.md
    python -m glc_jax.benchmark.throughput --size=full --dtypes=bfloat16 --batch_per_device=64

For each method (the pretraining methods and 'finetune', the DeepLabv3+
fine-tuning step), each device count (1, 2, 4, ... up to all local devices)
and each compute dtype, the method's real train step (glc_jax.methods, with
the config of configs/pretrain.py or configs/finetune.py) runs on ONE batch
already on the devices: no data pipeline is timed. The batch is made by the
method's own input recipe from random uint8 tiles, so patch boxes and masks
are realistic.

Columns: items/s (view pairs for the two-view methods, images otherwise) =
global batch / median step time over the timed steps, after warm-up (the
first call compiles); GFLOP per item = 2·MACs of every convolution and matmul
of the whole step (forward + backward, glc_jax/flops.py) / global batch; MFU
= those FLOPs / step time / (peak × devices), where the peak is the device's
dense bf16 tensor peak (table below, or --peak_tflops), for float32 steps
too; memory = the compiled step's per-device footprint from XLA's memory
analysis (arguments + outputs + temporaries − aliased), and the allocator's
peak in use since the process started where the backend reports it (GPU/TPU);
compile s = wall time of lower + compile; conv = model.conv_impl as given
('auto': 'cpu' kernels on CPU, 'plain' elsewhere; glc_jax/models/compute.py).
"""
from __future__ import annotations

import dataclasses
import math
import pathlib
import statistics
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

# Dense bf16 tensor-core peaks in TFLOP/s per device, by a substring of device_kind.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
                    ("A10G", 70.0), ("V100", 125.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
                    ("TPU v4", 275.0))
PRETRAIN_METHODS = ("glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr",
                    "mocov2", "inpainting", "jigsaw")
TWO_VIEW = ("glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr", "mocov2")

_METHODS = flags.DEFINE_list("methods", list(PRETRAIN_METHODS) + ["finetune"], "Methods to time.")
_SIZE = flags.DEFINE_enum("size", "tiny", ["tiny", "full"], "Model and input size of the configs.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
_CONV_IMPLS = flags.DEFINE_list("conv_impls", ["auto"], "model.conv_impl values: auto, plain, cpu.")
_DEVICES = flags.DEFINE_list("devices", [], "Device counts (default: 1, 2, 4, ... and all local).")
_BATCH = flags.DEFINE_integer("batch_per_device", 8, "Examples (pairs/images) per device per step.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (median reported).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "Peak TFLOP/s per device for MFU (0: from the known-device table).")
_OUT = flags.DEFINE_string("out", "", "Write the markdown table here too.")


@dataclasses.dataclass
class Result:
  method: str
  devices: int
  dtype: str
  global_batch: int
  step_s: float
  items_per_s: float
  gflop_per_item: float
  mfu: float | None
  xla_mib: float | None
  peak_mib: float | None
  compile_s: float | None = None
  conv_impl: str = "auto"


def device_peak_tflops(device: jax.Device, override: float = 0.0) -> float | None:
  if override > 0:
    return override
  kind = getattr(device, "device_kind", "")
  for name, peak in PEAK_BF16_TFLOPS:
    if name.lower() in kind.lower():
      return peak
  return None


def device_counts(available: int, requested: list[str]) -> list[int]:
  if requested:
    counts = sorted({int(n) for n in requested})
    if counts[0] < 1 or counts[-1] > available:
      raise ValueError(f"--devices {requested}: each must lie in 1..{available} local devices")
    return counts
  counts = [n for n in (2 ** k for k in range(int(math.log2(available)) + 1))]
  return sorted(set(counts + [available]))


def _stage_config(method: str, size: str):
  from glc_jax.benchmark import matrix  # pylint: disable=import-outside-toplevel
  tiny = ",tiny" if size == "tiny" else ""
  if method == "finetune":
    return matrix.load_config("finetune", f"random{tiny}")
  return matrix.load_config("pretrain", f"{method}{tiny}")


def host_batch(method: str, config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """One batch from the method's input recipe applied to random 4-band uint8 tiles."""
  from glc_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  example_fn = pipelines.recipe_for(pipelines.recipe_name(method), config.input,
                                    dataset={"norm": {"mode": "reference"}, "value_max": 255.0})
  tile = config.input.crop_size if method == "finetune" else 256
  examples = []
  for _ in range(batch):
    record = {"image": rng.integers(0, 256, (tile, tile, 4), dtype=np.uint8),
              "label": rng.integers(0, 6, (tile, tile), dtype=np.uint8)}
    examples.append(example_fn(record, rng))
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def step_config(method: str, size: str, dtype: str, conv_impl: str = "auto"):
  """The stage config of a method (or 'finetune') with model.dtype and model.conv_impl set."""
  config = _stage_config(method, size)
  config.model.dtype = dtype
  config.model.conv_impl = conv_impl
  if method == "finetune":
    config.method = "segmentation"
    config.model.num_classes = 6
  return config


def build_step(method: str, size: str, num_devices: int, dtype: str, batch_per_device: int,
               shapes_only: bool = False, conv_impl: str = "auto",
               host: dict[str, np.ndarray] | None = None, state=None):
  """(train_step, state, device batch, rng, global batch) of a method on the first devices.

  With `shapes_only`, state and batch are jax.ShapeDtypeStructs (enough to
  trace, e.g. for step_flops), and nothing is compiled. dtype and conv_impl
  set model.dtype and model.conv_impl. `host`: the global batch to use
  (default: a fresh one from host_batch). `state`: the train state (or its
  shapes) to return instead of a new one; a method's state does not depend
  on the dtype, kernels or batch size, so one serves all its steps.
  """
  from glc_jax import methods, optim, parallel  # pylint: disable=import-outside-toplevel
  config = step_config(method, size, dtype, conv_impl)
  mesh = parallel.make_data_mesh(jax.local_devices()[:num_devices])
  global_batch = batch_per_device * num_devices
  if host is None:
    host = host_batch(method, config, global_batch)
  batch = parallel.shard_host_batch(host, mesh)
  method_obj = methods.create_method(config)
  tx, schedule = optim.build_optimizer(config.optimizer, steps_per_epoch=1000, num_epochs=1,
                                       num_devices=num_devices, global_batch=global_batch)
  rng = jax.random.key(0)
  if shapes_only:
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
  if state is None and shapes_only:
    state = jax.eval_shape(lambda key: methods.init_train_state(method_obj, tx, mesh, key, batch), rng)
  elif state is None:
    state = methods.init_train_state(method_obj, tx, mesh, rng, batch)
  train_step = methods.make_train_step(method_obj, tx, schedule, mesh)
  return train_step, state, batch, rng, global_batch


def step_flops(train_step, state, batch, rng, num_devices: int) -> float:
  """FLOPs of one step over all devices (the traced shard_map body counts one device)."""
  from glc_jax import flops  # pylint: disable=import-outside-toplevel
  return flops.analytic_flops(train_step, state, batch, rng) * num_devices


def time_compiled(compiled, state, batch, rng, warmup: int, steps: int):
  """(median seconds per step over `steps` after `warmup` untimed steps, final state).

  The state passed in is donated; use the one returned.
  """
  times = []
  for i in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - start)
  return statistics.median(times), state


def time_step(method: str, size: str, num_devices: int, dtype: str, batch_per_device: int,
              warmup: int, steps: int, peak_override: float = 0.0,
              conv_impl: str = "auto") -> Result:
  """Compiles and times one method's train step on the first `num_devices` local devices."""
  train_step, state, batch, rng, global_batch = build_step(
      method, size, num_devices, dtype, batch_per_device, conv_impl=conv_impl)
  total_flops = step_flops(train_step, state, batch, rng, num_devices)
  start = time.perf_counter()
  compiled = train_step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - start
  step_s, _ = time_compiled(compiled, state, batch, rng, warmup, steps)
  devices = jax.local_devices()[:num_devices]
  peak = device_peak_tflops(devices[0], peak_override)
  mfu = total_flops / step_s / (peak * 1e12 * num_devices) if peak else None
  return Result(method, num_devices, dtype, global_batch, step_s, global_batch / step_s,
                total_flops / global_batch / 1e9, mfu, xla_footprint_mib(compiled),
                peak_in_use_mib(devices), compile_s, conv_impl)


def xla_footprint_mib(compiled) -> float | None:
  """Per-device arguments + outputs + temporaries − aliased bytes of a compiled step, MiB."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2 ** 20


def peak_in_use_mib(devices) -> float | None:
  """The allocator's peak bytes in use since the process started (max over devices), MiB."""
  peaks = []
  for device in devices:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / 2 ** 20


def _unit(method: str) -> str:
  return "pairs" if method in TWO_VIEW else "images"


def markdown_table(results: list[Result]) -> str:
  def opt(value, fmt):
    return "n/a" if value is None else format(value, fmt)

  lines = ["| method | devices | dtype | conv | global batch | median step s | items/s "
           "| GFLOP/item | MFU | XLA MiB/device | peak MiB | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in results:
    lines.append(f"| {r.method} | {r.devices} | {r.dtype} | {r.conv_impl} | {r.global_batch} "
                 f"| {r.step_s:.3f} "
                 f"| {r.items_per_s:.2f} {_unit(r.method)} | {r.gflop_per_item:.2f} "
                 f"| {opt(None if r.mfu is None else 100 * r.mfu, '.1f')}{'' if r.mfu is None else '%'} "
                 f"| {opt(r.xla_mib, '.0f')} | {opt(r.peak_mib, '.0f')} "
                 f"| {opt(r.compile_s, '.1f')} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  unknown = [m for m in _METHODS.value if m not in PRETRAIN_METHODS + ("finetune",)]
  if unknown:
    sys.exit(f"error: --methods: unknown {unknown}; expected some of "
             f"{', '.join(PRETRAIN_METHODS + ('finetune',))}")
  bad = [d for d in _DTYPES.value if d not in ("float32", "bfloat16")]
  if bad:
    sys.exit(f"error: --dtypes: unknown {bad}; expected float32 and/or bfloat16")
  bad = [c for c in _CONV_IMPLS.value if c not in ("auto", "plain", "cpu")]
  if bad:
    sys.exit(f"error: --conv_impls: unknown {bad}; expected some of auto, plain, cpu")
  try:
    counts = device_counts(jax.local_device_count(), _DEVICES.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  device = jax.local_devices()[0]
  peak = device_peak_tflops(device, _PEAK.value)
  header = (f"{jax.local_device_count()} × {device.device_kind} ({jax.default_backend()}), "
            f"jax {jax.__version__}; size {_SIZE.value}, {_BATCH.value} per device, "
            f"median of {_STEPS.value} steps after {_WARMUP.value} warm-up; MFU vs "
            + (f"{peak:g} TFLOP/s per device" if peak else "n/a (no known peak; --peak_tflops)"))
  print(header, flush=True)
  results = []
  cases = [(m, d, c, n) for m in _METHODS.value for d in _DTYPES.value
           for c in _CONV_IMPLS.value for n in counts]
  for method, dtype, conv_impl, n in cases:
    r = time_step(method, _SIZE.value, n, dtype, _BATCH.value, _WARMUP.value, _STEPS.value,
                  _PEAK.value, conv_impl)
    results.append(r)
    print(f"{method} {dtype} conv {conv_impl} ×{n}: {r.step_s:.3f} s/step, "
          f"{r.items_per_s:.2f} {_unit(method)}/s, compiled in {r.compile_s:.1f} s", flush=True)
    if _OUT.value:  # after every row, so a long run killed midway keeps its rows
      path = pathlib.Path(_OUT.value)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(header + "\n\n" + markdown_table(results) + "\n")
  print(markdown_table(results))


if __name__ == "__main__":
  app.run(main)
