"""Where the TPU compile time of a train step goes, measured on a host without a TPU.

Needs libtpu (`pip install -e '.[aot]'`); compiles for a named TPU topology's
compile-only devices, like glc_jax/benchmark/aot.py, and runs nothing. Run one
compile process at a time: a full-size GLCNet step takes 4 to 16 minutes on
a 2-core host, depending on its load. docs/scaling.md ("Compile time") gives
the figures these commands produced.

    python benchmarks/compile_time.py --topology=v5e:2x2 --part=step --pass_times \
        --out=/tmp/compile_time.jsonl          # the full GLCNet step, split
    python benchmarks/compile_time.py --part=grad --stage_blocks=3,4,1,3 \
        --view_size=96 --patch_size=16 --batch_per_chip=8   # a smaller program
    python benchmarks/compile_time.py --kernel_times=/tmp/kernels   # per-kernel times
    python benchmarks/compile_time.py --part=conv --conv=128,28,128,128,3 \
        --conv_context=fused                   # one conv's forward + gradients
    python benchmarks/compile_time.py --scan_blocks        # the lax.scan lever
    python benchmarks/compile_time.py --effort=-1          # XLA's optimisation effort
    LIBTPU_INIT_ARGS=--xla_jf_conv_input_fusion=false python benchmarks/compile_time.py

Each run appends one JSON row to --out (and prints it) with the wall and CPU
seconds (getrusage, all threads) of the three jax.stages steps: trace
(Python → jaxpr), lower (jaxpr → StableHLO) and compile (libtpu's XLA: HLO
passes, then the TPU backend's code generation of every fusion), the
compiled program's instruction and fusion counts, and XLA's memory plan per
chip. With --pass_times, libtpu logs every HLO pass with its time
(TPU_VMODULE=hlo_pass_pipeline=1) and its own stage durations
(--xla_jf_print_compilation_stats: HLO_PASSES, BACKEND_PASSES = the TPU
backend's code generation of every kernel, CODE_GENERATION, END_TO_END),
read back from its stderr.

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


def stage_seconds(log_text: str) -> dict[str, float]:
  """libtpu's own compile split (--xla_jf_print_compilation_stats): HLO_PASSES,
  BACKEND_PASSES (per-kernel LLO code generation), CODE_GENERATION, END_TO_END."""
  totals: dict[str, float] = {}
  for name, hours, minutes, seconds in re.findall(
      r"\b([A-Z_]+) stage duration: (?:(\d+)h)?(?:(\d+)m)?([\d.]+)s", log_text):
    value = 3600 * float(hours or 0) + 60 * float(minutes or 0) + float(seconds)
    totals[name] = totals.get(name, 0.0) + value
  return totals


def kernel_seconds(dump_dir: str) -> list[dict]:
  """Per-kernel backend compile seconds from an --xla_jf_dump_to directory.

  libtpu names each kernel's dump files '<start ns>-<fusion>-NN-<pass>.txt' (the
  start of that kernel's LLO compilation); with only the final_bundles pass
  dumped, a file's modification time is the kernel's end. Each kernel is
  labelled from the module's HLO (TLP-hlo.txt): what its fusion computes (a
  forward conv, a conv's input or weight gradient, or anything else) and the
  op_name of the JAX operation it comes from.
  """
  names = os.listdir(dump_dir)
  hlo_text = _read_text(os.path.join(dump_dir, next(n for n in names if n.endswith("TLP-hlo.txt"))))
  bodies = dict(re.findall(r"^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}", hlo_text, re.S | re.M))
  fusions = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*?) fusion\(.*calls=%([\w.\-]+)", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      fusions[match.group(1)] = (match.group(2), match.group(3), op_name.group(1) if op_name else "")
  kernels = []
  for name in names:
    match = re.match(r"^(\d+)-(.*)-\d\d-final_bundles\.txt$", name)
    if not match or match.group(2) not in fusions:
      continue
    shape, calls, op_name = fusions[match.group(2)]
    seconds = os.path.getmtime(os.path.join(dump_dir, name)) - int(match.group(1)) / 1e9
    backward = "transpose(" in op_name
    window = re.match(r"\w+\[(\d+),(\d+),\d+,\d+\]", shape)
    if " convolution(" not in bodies.get(calls, ""):
      kind = "other"
    elif not backward:
      kind = "conv forward"
    elif window and window.group(1) == window.group(2) and int(window.group(1)) <= 7:
      kind = "conv weight gradient"  # its result is a (k, k, in, out) kernel
    else:
      kind = "conv input gradient"
    kernels.append(dict(kernel=match.group(2), kind=kind, seconds=seconds,
                        op=re.sub(r"^jit\(\w+\)/shard_map/", "", op_name)))
  return sorted(kernels, key=lambda k: -k["seconds"])


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


def conv_probe(args) -> dict:
  """Compile time of one 3×3/1×1 conv's forward + both gradients, alone or inside BN-like affines.

  'bare': loss = Σ conv(x, w)·g; 'fused': loss = Σ (relu(x·a + b) ⊛ w · c + d)², so that XLA
  fuses the affine/ReLU producers into the weight- and input-gradient convolutions, as it
  does for every conv of the ResNet step (BatchNorm backward, ReLU).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from glc_jax import parallel  # pylint: disable=import-outside-toplevel
  from glc_jax.benchmark import aot  # pylint: disable=import-outside-toplevel

  b, h, cin, cout, k = (int(v) for v in args.conv.split(","))
  bf16 = jnp.bfloat16

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(k // 2, k // 2)] * 2,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def bare(w, x, g, a, c):
    del a, c
    return jnp.sum((conv(x, w) * g).astype(jnp.float32))

  def fused(w, x, g, a, c):
    del g
    y = conv(jax.nn.relu(x * a[0] + a[1]), w)
    return jnp.sum(jnp.square((y * c[0] + c[1]).astype(jnp.float32)))

  loss = {"bare": bare, "fused": fused}[args.conv_context]
  mesh = parallel.make_data_mesh(aot.topology_devices(args.topology)[:1])
  sharding = parallel.replicated_sharding(mesh)
  shapes = [jax.ShapeDtypeStruct(shape, bf16, sharding=sharding) for shape in
            ((k, k, cin, cout), (b, h, h, cin), (b, h, h, cout), (2, cin), (2, cout))]
  fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
  traced, trace_s, trace_cpu = _timed(lambda: fn.trace(*shapes))
  lowered, lower_s, lower_cpu = _timed(traced.lower)
  compiled, compile_s, compile_cpu = _timed(lowered.compile)
  return dict(part="conv", conv=args.conv, conv_context=args.conv_context,
              topology=args.topology, trace_s=trace_s, lower_s=lower_s, compile_s=compile_s,
              compile_cpu_s=compile_cpu, **hlo_counts(compiled.as_text()))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--part", choices=("forward", "grad", "step", "conv"), default="step")
  parser.add_argument("--conv", default="128,28,128,128,3",
                      help="--part=conv: batch,side,in channels,out channels,kernel of one conv")
  parser.add_argument("--conv_context", choices=("bare", "fused"), default="fused",
                      help="--part=conv: the conv alone or between BN-like affines and a ReLU")
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
  parser.add_argument("--kernel_times", default="",
                      help="dump each kernel's final LLO into this (new) directory and time "
                           "every kernel's backend compile from it (slows the compile)")
  parser.add_argument("--libtpu_log", default="",
                      help="with --pass_times: keep libtpu's log in this file (default: a temporary one)")
  parser.add_argument("--out", default="", help="append the row, as one JSON line, to this file")
  args = parser.parse_args()
  if args.stage_blocks and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*){3}", args.stage_blocks):
    sys.exit(f"error: --stage_blocks={args.stage_blocks!r}: expected four positive counts, "
             "e.g. 3,4,6,3")
  if args.kernel_times:
    if os.path.exists(args.kernel_times):
      sys.exit(f"error: --kernel_times={args.kernel_times}: already exists; name a new directory")
    os.environ["LIBTPU_INIT_ARGS"] = (
        os.environ.get("LIBTPU_INIT_ARGS", "") + f" --xla_jf_dump_to={args.kernel_times}"
        " --xla_jf_dump_llo_pass_label_regex=final_bundles").strip()
  libtpu_args = os.environ.get("LIBTPU_INIT_ARGS", "")
  log = None
  if args.pass_times:
    # Before libtpu loads (at the first topology request): its own logging
    # flags, and its stderr into a file to read the pass times back from.
    os.environ.update(TPU_VMODULE="hlo_pass_pipeline=1", TPU_MIN_LOG_LEVEL="0",
                      TPU_STDERR_LOG_LEVEL="0",
                      LIBTPU_INIT_ARGS=(os.environ.get("LIBTPU_INIT_ARGS", "")
                                        + " --xla_jf_print_compilation_stats=true").strip())
    log = (open(args.libtpu_log, "w+", encoding="utf-8") if args.libtpu_log else
           tempfile.NamedTemporaryFile("w+", prefix="compile_time_", suffix=".log"))
    saved_stderr = os.dup(2)
    os.dup2(log.fileno(), 2)
  load_before = os.getloadavg()[0]
  try:
    row = conv_probe(args) if args.part == "conv" else measure(args)
  finally:
    if log is not None:
      os.dup2(saved_stderr, 2)
  row["load_average"] = [load_before, os.getloadavg()[0]]
  row["libtpu_init_args"] = libtpu_args
  if args.kernel_times:
    kernels = kernel_seconds(args.kernel_times)
    by_kind: dict[str, list[float]] = {}
    for k in kernels:
      by_kind.setdefault(k["kind"], []).append(k["seconds"])
    row["kernels_by_kind"] = {kind: {"kernels": len(v), "seconds": sum(v)}
                              for kind, v in by_kind.items()}
    row["slowest_kernels"] = kernels[:12]
  if log is not None:
    text = _read_text(log.name)
    passes = pass_seconds(text)
    row["stages_s"] = stage_seconds(text)
    row["hlo_pass_s"] = sum(passes.values())
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
