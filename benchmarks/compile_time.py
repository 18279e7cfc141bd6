"""Where the TPU compile time of a train step goes, measured on a host without a TPU.

Needs libtpu (`pip install -e '.[aot]'`); compiles for a named TPU topology's
compile-only devices, like glc_jax/benchmark/aot.py, and runs nothing. Run one
compile process at a time: a full-size GLCNet step takes 7 to 16 minutes of
one core.

    python benchmarks/compile_time.py --topology=v5e:2x2 --part=step --pass_times \
        --out=/tmp/compile_time.jsonl          # the full GLCNet step, split
    python benchmarks/compile_time.py --part=grad --stage_blocks=3,4,1,3 \
        --view_size=96 --batch_per_chip=8      # a smaller program, to see what scales
    python benchmarks/compile_time.py --scan_blocks ...   # the lax.scan lever

Each run appends one JSON row to --out (and prints it) with the wall and CPU
seconds (getrusage, all threads) of the three jax.stages steps: trace
(Python → jaxpr), lower (jaxpr → StableHLO) and compile (libtpu's XLA: HLO
passes, then the TPU backend's code generation of every fusion), the
compiled program's instruction and fusion counts, and XLA's memory plan per
chip. With --pass_times, libtpu logs every HLO pass with its time
(TPU_VMODULE=hlo_pass_pipeline=1, read back from its stderr); their sum is
the HLO-pass share of the compile, the rest is the backend's.

--part picks how much of the step is compiled: 'forward' (the train-mode loss,
BatchNorm statistics updated), 'grad' (loss and parameter gradients, summed
over chips by shard_map) or 'step' (the real train step, optimiser included;
what train.py compiles). --stage_blocks changes the number of bottleneck
blocks per ResNet stage (a measurement-only patch of glc_jax.models.resnet's
table; 3,4,6,3 is ResNet-50, 3,4,23,3 ResNet-101). --scan_blocks runs each
stage's blocks after the first as one nn.scan over stacked parameters (a
prototype with another parameter tree, for measurement only: checkpoints and
the torch weight importer use the unstacked names).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import sys
import tempfile
import time


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(fn):
  """(fn(), wall s, CPU s)."""
  wall, cpu = time.perf_counter(), _cpu_seconds()
  out = fn()
  return out, time.perf_counter() - wall, _cpu_seconds() - cpu


_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (us|ms|s) ")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def pass_seconds(log_text: str) -> dict[str, float]:
  """Seconds per HLO pass name, summed over its runs, from libtpu's hlo_pass_pipeline log."""
  totals: dict[str, float] = {}
  for name, value, unit in _PASS.findall(log_text):
    totals[name] = totals.get(name, 0.0) + float(value) * _UNIT[unit]
  return totals


def scanned_resnet():
  """ResNet whose stages run blocks 1..n-1 as one nn.scan (prototype, stacked parameters)."""
  import functools  # pylint: disable=import-outside-toplevel

  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  from glc_jax.models import resnet  # pylint: disable=import-outside-toplevel
  from glc_jax.models.layers import BatchNorm, Conv2d, kaiming_normal, max_pool  # pylint: disable=import-outside-toplevel

  class CarriedBottleneck(resnet.Bottleneck):
    """A Bottleneck with nn.scan's (carry, x) → (carry, y) signature."""

    def __call__(self, x, unused):  # pylint: disable=arguments-differ
      return super().__call__(x), None

  class ScannedResNet(resnet.ResNet):

    @nn.compact
    def __call__(self, x, train, bn_groups=1):
      strides, dilations = resnet.STRIDES_DILATIONS[self.output_stride]
      norm = functools.partial(BatchNorm, train=train, groups=bn_groups,
                               axis_name=self.axis_name, dtype=self.dtype)
      x = x.astype(self.dtype)
      x = Conv2d(resnet.scaled(64, self.width), 7, 2, 3, dtype=self.dtype,
                 conv_impl=self.conv_impl, kernel_init=kaiming_normal, name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      x = max_pool(x, 3, 2, 1, self.conv_impl)
      features = {}
      for stage, (n_blocks, stride, dilation) in enumerate(
          zip(resnet.STAGE_BLOCKS[self.depth], strides, dilations), start=1):
        planes = resnet.scaled(64 * 2 ** (stage - 1), self.width)
        x = resnet.Bottleneck(planes, stride, dilation, norm=norm, dtype=self.dtype,
                              conv_impl=self.conv_impl, name=f"layer{stage}_0")(x)
        if n_blocks > 1:
          rest = nn.scan(CarriedBottleneck, variable_axes={"params": 0, "batch_stats": 0},
                         split_rngs={"params": True}, length=n_blocks - 1)
          x, _ = rest(planes, 1, dilation, norm=norm, dtype=self.dtype,
                      conv_impl=self.conv_impl, name=f"layer{stage}_rest")(x, None)
        features[f"layer{stage}"] = x
      return features

  return ScannedResNet


def partial_step(method, mesh, part: str):
  """The jitted, sharded 'forward' or 'grad' part of make_train_step's step, same in/out specs."""
  import jax  # pylint: disable=import-outside-toplevel

  from glc_jax import parallel  # pylint: disable=import-outside-toplevel

  def body(state, batch, rng):
    rng = jax.random.fold_in(jax.random.fold_in(rng, state.step),
                             jax.lax.axis_index(parallel.DATA_AXIS))
    if part == "forward":
      loss, aux = method.loss(state.params, state, batch, rng)
      return loss, aux.batch_stats
    (loss, aux), grads = jax.value_and_grad(method.loss, has_aux=True)(
        state.params, state, batch, rng)
    return loss, (grads, aux.batch_stats)

  sharded = jax.shard_map(
      body, mesh=mesh,
      in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC, parallel.REPLICATED_SPEC),
      out_specs=parallel.REPLICATED_SPEC)
  replicated = parallel.replicated_sharding(mesh)
  return jax.jit(sharded, in_shardings=(replicated, parallel.batch_sharding(mesh), replicated),
                 out_shardings=replicated)


def hlo_counts(hlo_text: str) -> dict[str, int]:
  """Instructions, fusions and convolutions of a compiled module's text (one chip's program)."""
  lines = [l for l in hlo_text.splitlines() if re.match(r"\s+(ROOT )?%?\S+ = ", l)]
  return {"instructions": len(lines),
          "fusions": sum(bool(re.search(r" fusion\(", l)) for l in lines),
          "convolutions": sum(bool(re.search(r" convolution\(", l)) for l in lines),
          "while_loops": sum(bool(re.search(r" while\(", l)) for l in lines)}


def measure(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel

  from glc_jax import methods, parallel  # pylint: disable=import-outside-toplevel
  from glc_jax.benchmark import aot  # pylint: disable=import-outside-toplevel
  from glc_jax.models import glcnet, resnet  # pylint: disable=import-outside-toplevel

  if args.stage_blocks:
    resnet.STAGE_BLOCKS[50] = tuple(int(n) for n in args.stage_blocks.split(","))
  if args.scan_blocks:
    glcnet.ResNet = scanned_resnet()
  if args.effort is not None:
    jax.config.update("jax_exec_time_optimization_effort", args.effort)
  overrides = {"input": {"view_size": args.view_size, "patch_size": args.patch_size}}
  mesh = parallel.make_data_mesh(aot.topology_devices(args.topology))
  step = aot.build_step("glcnet", mesh, dtype=args.dtype, conv_impl="plain",
                        batch_per_chip=args.batch_per_chip, overrides=overrides)
  fn = step.fn
  if args.part != "step":
    config = aot.stage_config("glcnet", "full")
    config.model.update(dtype=args.dtype, conv_impl="plain", remat="")
    config.update(overrides)
    fn = partial_step(methods.create_method(config), mesh, args.part)
  traced, trace_s, trace_cpu = _timed(lambda: fn.trace(*step.args))
  lowered, lower_s, lower_cpu = _timed(traced.lower)
  compiled, compile_s, compile_cpu = _timed(lowered.compile)
  memory = aot.memory_gib(compiled)
  return dict(
      part=args.part, topology=args.topology, chips=mesh.size,
      stage_blocks=list(resnet.STAGE_BLOCKS[50]), scan_blocks=args.scan_blocks,
      view_size=args.view_size, batch_per_chip=args.batch_per_chip, dtype=args.dtype,
      effort=args.effort,
      trace_s=trace_s, trace_cpu_s=trace_cpu, lower_s=lower_s, lower_cpu_s=lower_cpu,
      compile_s=compile_s, compile_cpu_s=compile_cpu,
      stablehlo_ops=lowered.as_text().count(" = "), **hlo_counts(compiled.as_text()),
      total_gib=memory["total_gib"], temp_gib=memory["temp_gib"],
      xla_gflop_per_pair=(aot.xla_flops(compiled) or 0.0) / args.batch_per_chip / 1e9)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--part", choices=("forward", "grad", "step"), default="step")
  parser.add_argument("--stage_blocks", default="",
                      help="bottleneck blocks per stage, e.g. 3,4,2,3 (default: ResNet-50's)")
  parser.add_argument("--view_size", type=int, default=224)
  parser.add_argument("--patch_size", type=int, default=48)
  parser.add_argument("--batch_per_chip", type=int, default=64)
  parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  parser.add_argument("--scan_blocks", action="store_true")
  parser.add_argument("--effort", type=float, default=None,
                      help="jax_exec_time_optimization_effort in [-1, 1] (default: XLA's)")
  parser.add_argument("--pass_times", action="store_true",
                      help="log libtpu's HLO pass times and sum them (HLO passes vs backend)")
  parser.add_argument("--out", default="", help="append the row, as one JSON line, to this file")
  args = parser.parse_args()
  if args.stage_blocks and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*){3}", args.stage_blocks):
    sys.exit(f"error: --stage_blocks={args.stage_blocks!r}: expected four positive counts, "
             "e.g. 3,4,6,3")
  log = None
  if args.pass_times:
    # Before libtpu loads (at the first topology request): its own logging
    # flags, and its stderr into a file to read the pass times back from.
    os.environ.update(TPU_VMODULE="hlo_pass_pipeline=1", TPU_MIN_LOG_LEVEL="0",
                      TPU_STDERR_LOG_LEVEL="0")
    log = tempfile.NamedTemporaryFile("w+", prefix="compile_time_", suffix=".log")
    saved_stderr = os.dup(2)
    os.dup2(log.fileno(), 2)
  load_before = os.getloadavg()[0]
  try:
    row = measure(args)
  finally:
    if log is not None:
      os.dup2(saved_stderr, 2)
  row["load_average"] = [load_before, os.getloadavg()[0]]
  if log is not None:
    passes = pass_seconds(_read_text(log.name))
    row["hlo_pass_s"] = sum(passes.values())
    row["backend_s"] = row["compile_s"] - row["hlo_pass_s"]
    row["top_passes_s"] = dict(sorted(passes.items(), key=lambda kv: -kv[1])[:8])
  text = json.dumps(row)
  print(text, flush=True)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(text + "\n")


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8", errors="replace") as f:
    return f.read()


if __name__ == "__main__":
  main()
