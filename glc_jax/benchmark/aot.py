"""Ahead-of-time compilation of the real train steps for TPU slices, on a host without TPUs.

    pip install -e '.[aot]'    # libtpu: compiles for TPUs, needs none
    python -m glc_jax.benchmark.aot --methods=glcnet --topologies=v5e:2x2,v4:2x2x1,v5p:2x2x1 \
        --out=aot_table            # writes aot_table.md and aot_table.json, row by row
    python -m glc_jax.benchmark.aot --methods=glcnet --topologies=v5p:2x2x1 --fit_batch

Each method's step (the pretraining methods through glc_jax.methods, 'finetune'
= the DeepLabv3+ fine-tuning step, 'evaluate' = the evaluation forward of
glc_jax/stages/evaluate.py) is traced on abstract shapes (the batch shapes come
from the method's own input recipe), lowered over a data mesh of a named TPU
topology (`jax.experimental.topologies`, compile-only devices) and compiled by
libtpu's XLA. Nothing runs: the table gives what the compiler knows, per chip:

  compile s     wall and CPU seconds of lowering + XLA compilation on this host
  memory        XLA's memory analysis: arguments, outputs, temporaries, aliased
                (donated) bytes, and their total = args + outputs + temps − aliased;
                fits = total ≤ the generation's HBM (HBM_GIB)
  FLOPs/item    XLA's cost analysis of the per-chip program / per-chip batch,
                beside glc_jax/flops.py's 2·MACs count of the same trace
  collectives   bytes per chip per step of every all-gather / all-reduce /
                reduce-scatter, from the lowered program (where each one comes
                from: NT-Xent embedding gathers, gradient all-reduce, BatchNorm
                statistics, loss scalars) and from the compiled HLO (after
                XLA's combining and rewriting); the payload is the collective's
                result size on one chip, the ring estimate of bytes each chip
                sends is payload·(n−1)/n for a gather and 2·payload·(n−1)/n for
                an all-reduce
  max batch     with --fit_batch: the largest per-chip batch whose compiled
                total fits HBM, by bisection (one compile per probe)

A generation's devices are its chips: v4 and v5p are compiled as megacore
chips (one device per chip, as JAX runs them); v5e has one core per chip.
`--num_slices` > 1 lowers over several slices of the topology (multi-slice,
the data axis spans the data-centre network between them).

libtpu allows one process at a time unless ALLOW_MULTIPLE_LIBTPU_LOAD is set;
compiling needs no TPU, so this module sets it, and the TPU host variables
libtpu would otherwise query a metadata server for, unless already set.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

# Before libtpu is loaded (by the first topology request): compile-only use on
# a host without TPUs, several processes at once.
for _key, _value in (("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"), ("TPU_SKIP_MDS_QUERY", "1"),
                     ("TPU_ACCELERATOR_TYPE", "v5litepod-4"), ("TPU_WORKER_HOSTNAMES", "localhost")):
  os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from glc_jax import files, parallel  # noqa: E402
# host_batch gives the batch shapes; its flags --methods, --size and --out are
# replaced by this module's own (allow_override below).
from glc_jax.benchmark import throughput  # noqa: E402

# HBM per chip in GiB, by the generation prefix of a topology name (Cloud TPU
# system architecture pages); the compiler's own limit, where it reports one
# in an out-of-memory error, agrees (docs/scaling.md).
HBM_GIB = {"v4": 32.0, "v5e": 16.0, "v5p": 95.0, "v6e": 32.0}
# Generations whose chips hold two TensorCores that JAX drives as one device.
MEGACORE = ("v4", "v5p")
PRETRAIN_METHODS = ("glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr",
                    "mocov2", "inpainting", "jigsaw")
METHODS = PRETRAIN_METHODS + ("finetune", "evaluate")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass
class AbstractStep:
  """A jitted function and abstract arguments to lower it with."""
  fn: Any
  args: tuple[Any, ...]
  batch_per_chip: int
  unit: str  # what one batch item is: 'pairs' or 'images'


@dataclasses.dataclass
class Row:
  method: str
  topology: str
  generation: str
  chips: int
  num_slices: int
  dtype: str
  conv_impl: str
  remat: str
  batch_per_chip: int
  global_batch: int
  lower_s: float
  compile_s: float | None
  compile_cpu_s: float | None
  argument_gib: float | None
  output_gib: float | None
  temp_gib: float | None
  alias_gib: float | None
  total_gib: float | None
  hbm_gib: float
  fits: bool | None
  xla_gflop_per_item: float | None
  analytic_gflop_per_item: float | None
  collectives: dict[str, float]  # source → payload MiB per chip per step (lowered program)
  compiled_collectives: dict[str, float]  # HLO op → payload MiB per chip per step (compiled)
  max_batch_per_chip: int | None = None
  unit: str = "pairs"


def generation(topology: str) -> str:
  """'v5e' of 'v5e:2x2'; raises on a generation without a known HBM size."""
  gen = topology.split(":")[0]
  if gen not in HBM_GIB:
    raise ValueError(f"topology {topology!r}: unknown generation {gen!r}; expected one of "
                     f"{sorted(HBM_GIB)} (e.g. v5e:2x2, v4:2x2x1, v5p:8x8x4)")
  return gen


def topology_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """Compile-only devices of a TPU topology (one per chip), `num_slices` copies of it."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  gen = generation(topology)
  kwargs = {"chip_config_name": "megacore"} if gen in MEGACORE else {}
  if num_slices > 1:
    kwargs["num_slices"] = num_slices
  return list(topologies.get_topology_desc(topology, "tpu", **kwargs).devices)


def stage_config(method: str, size: str):
  """The stage config a method's step is built from (configs/pretrain.py or finetune.py)."""
  from glc_jax.benchmark import matrix  # pylint: disable=import-outside-toplevel
  tiny = ",tiny" if size == "tiny" else ""
  if method in ("finetune", "evaluate"):
    config = matrix.load_config("finetune", f"random{tiny}")
    config.method = "segmentation"
    config.model.num_classes = 6
    return config
  return matrix.load_config("pretrain", f"{method}{tiny}")


def _example(method: str, config) -> dict[str, np.ndarray]:
  """One example of the method's input recipe, as a batch of one."""
  return throughput.host_batch("finetune" if method == "evaluate" else method, config, 1)


def _abstract(tree: Any, sharding: NamedSharding) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def build_step(method: str, mesh: jax.sharding.Mesh, *, size: str = "full",
               dtype: str = "bfloat16", conv_impl: str = "plain", remat: str = "",
               batch_per_chip: int = 64, overrides: Mapping[str, Any] | None = None,
               ) -> AbstractStep:
  """The method's real step over `mesh` with abstract state and batch of the given shapes.

  dtype / conv_impl / remat are model.dtype / model.conv_impl / model.remat;
  they are never 'auto' here, since 'auto' would resolve for this host's backend.
  overrides: nested config keys to change, e.g. {"model": {"depth": 18}}.
  """
  from glc_jax import methods, optim  # pylint: disable=import-outside-toplevel
  config = stage_config(method, size)
  config.model.update(dtype=dtype, conv_impl=conv_impl, remat=remat)
  config.update(overrides or {})
  chips = mesh.size
  global_batch = batch_per_chip * chips
  example = _example(method, config)
  batch = _abstract({k: jax.ShapeDtypeStruct((global_batch,) + v.shape[1:], v.dtype)
                     for k, v in example.items()}, parallel.batch_sharding(mesh))
  replicated = parallel.replicated_sharding(mesh)
  method_obj = methods.create_method(config)
  unit = "pairs" if "view2" in example else "images"
  if method == "evaluate":
    model = method_obj.model
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                               jax.ShapeDtypeStruct((1,) + batch["image"].shape[1:], np.float32))
    forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                      in_shardings=(replicated, parallel.batch_sharding(mesh)))
    return AbstractStep(forward, (_abstract(variables, replicated), batch["image"]),
                        batch_per_chip, unit)
  tx, schedule = optim.build_optimizer(config.optimizer, steps_per_epoch=1000, num_epochs=1,
                                       num_devices=chips, global_batch=global_batch)
  rng = jax.random.key(0)
  state = jax.eval_shape(lambda key: methods.init_train_state(method_obj, tx, mesh, key, batch), rng)
  step = methods.make_train_step(method_obj, tx, schedule, mesh)
  rng_shape = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=replicated)
  return AbstractStep(step, (_abstract(state, replicated), batch, rng_shape), batch_per_chip, unit)


def _shape_bytes(text: str) -> int:
  """Bytes of the HLO shapes in `text` ('f32[64,128]{1,0}', tuples of them)."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def compiled_collective_bytes(hlo_text: str) -> dict[str, int]:
  """Result bytes per collective op kind in an HLO module's text (one device's program).

  Async pairs count once (the '-start' op, whose result tuple holds the
  operand too, is counted by its '-done' result instead).
  """
  totals: dict[str, int] = {}
  pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-done)?\(")
  for line in hlo_text.splitlines():
    # Tuples of six or more elements carry /*index=N*/ comments, whose '=' the pattern forbids.
    line = re.sub(r"/\*.*?\*/", "", line)
    match = pattern.search(line)
    if match and not re.search(r"(" + "|".join(COLLECTIVES) + r")-start\(", line):
      totals[match.group(2)] = totals.get(match.group(2), 0) + _shape_bytes(match.group(1))
  return totals


def _collective_source(kind: str, origin: str) -> str:
  """What a collective of the lowered step is for, from its op and its location chain.

  Gradients of replicated parameters are summed by shard_map's transpose
  ('psum_invariant' in the backward pass); BatchNorm's statistic sums are
  psums in BatchNorm.__call__ (their backward sums, and its own scale and
  bias gradients, tiny beside the conv kernels, are counted with them).
  """
  backward = "transpose(" in origin
  if "losses.py" in origin:
    if kind == "all_gather":
      return "embedding all-gather"
    if kind == "reduce_scatter":
      return "embedding all-gather backward (reduce-scatter)"
    return "loss scalars"
  if "BatchNorm" in origin:
    return "BatchNorm statistics" + (" backward" if backward else "")
  return "gradient all-reduce" if backward else f"other {kind}"


def lowered_collective_bytes(lowered) -> dict[str, int]:
  """Result bytes per source (see _collective_source) of each collective in the lowered program."""
  text = lowered.as_text(debug_info=True)
  locations = dict(re.findall(r"^(#loc\d*) = (loc\(.*\))$", text, re.M))

  def origin(ref: str) -> str:
    seen, parts, todo = set(), [], [ref]
    while todo:  # the op's name and every frame its location chain names
      ref = todo.pop()
      if ref not in seen:
        seen.add(ref)
        parts.append(locations.get(ref, ""))
        todo.extend(re.findall(r"#loc\d*", locations.get(ref, "")))
    return " ".join(parts)

  totals: dict[str, int] = {}
  op = re.compile(r'"stablehlo\.(all_gather|all_reduce|reduce_scatter)"\(')
  # An op's own signature is the first '-> RESULT loc(...)' after its name: the
  # ops in an all_reduce's reduction region have no '->'. (A pattern spanning
  # name to signature in one match ran past an all_gather, whose attributes end
  # in '}>', into the next op with a ') : (' and took that op's result.)
  signature = re.compile(r"->\s*(.*?)\s+loc\((#loc\d*)\)", re.S)
  for match in op.finditer(text):
    result, ref = signature.search(text, match.end()).groups()
    source = _collective_source(match.group(1), origin(ref))
    totals[source] = totals.get(source, 0) + _tensor_bytes(result)
  return totals


def _tensor_bytes(mlir_types: str) -> int:
  total = 0
  for dims, dtype in re.findall(r"tensor<((?:\d+x)*)([a-z]+\d*)>", mlir_types):
    size = {"i1": 1, "i8": 1, "ui8": 1, "bf16": 2, "f16": 2, "i32": 4, "ui32": 4, "f32": 4,
            "i64": 8, "f64": 8}.get(dtype, 4)
    total += size * math.prod(int(d) for d in dims.split("x") if d)
  return total


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def compile_step(step: AbstractStep):
  """(lowered, compiled, lower wall s, compile wall s, compile CPU s)."""
  start = time.perf_counter()
  lowered = step.fn.lower(*step.args)
  lowered_at = time.perf_counter()
  cpu = _cpu_seconds()
  compiled = lowered.compile()
  return (lowered, compiled, lowered_at - start, time.perf_counter() - lowered_at,
          _cpu_seconds() - cpu)


def memory_gib(compiled) -> dict[str, float]:
  m = compiled.memory_analysis()
  gib = 2.0 ** 30
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return {"argument_gib": m.argument_size_in_bytes / gib, "output_gib": m.output_size_in_bytes / gib,
          "temp_gib": m.temp_size_in_bytes / gib, "alias_gib": m.alias_size_in_bytes / gib,
          "total_gib": total / gib}


def xla_flops(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return None if flops is None or flops < 0 else float(flops)


def analytic_flops(step: AbstractStep) -> float:
  """2·MACs per chip of the traced step (glc_jax/flops.py)."""
  from glc_jax import flops  # pylint: disable=import-outside-toplevel
  return flops.analytic_flops(step.fn, *step.args)


def is_out_of_memory(error: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error)


def largest_fitting_batch(fits: Callable[[int], bool], known_fit: int, granularity: int = 8,
                          limit: int = 4096) -> int:
  """Largest multiple of `granularity` (or `known_fit`) b ≤ limit with fits(b), by bisection.

  `fits` must be monotone (a batch that fits implies every smaller one fits);
  `known_fit` is a batch known to fit. Doubles until a batch does not fit,
  then bisects between the last fit and the first failure.
  """
  lo, hi = known_fit, None
  probe = max(granularity, known_fit * 2)
  while hi is None:
    if probe > limit:
      return lo
    if fits(probe):
      lo, probe = probe, probe * 2
    else:
      hi = probe
  while hi - lo > granularity:
    mid = (lo + hi) // 2 // granularity * granularity
    if mid <= lo:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


def measure(method: str, topology: str, *, num_slices: int = 1, size: str = "full",
            dtype: str = "bfloat16", conv_impl: str = "plain", remat: str = "",
            batch_per_chip: int = 64, fit_batch: bool = False, compile: bool = True) -> Row:
  """Lowers (and, with `compile`, compiles) one method's step for a topology.

  Without `compile` only what the lowered program tells is filled in (its
  collectives and the 2·MACs count); memory, XLA FLOPs and compile time are None.
  """
  gen = generation(topology)
  devices = topology_devices(topology, num_slices)
  if num_slices > 1:
    # jax.make_mesh (parallel.make_data_mesh) fits a mesh to one slice's
    # physical torus and rejects several; the data axis only needs an order.
    mesh = jax.sharding.Mesh(np.array(devices), (parallel.DATA_AXIS,),
                             axis_types=(jax.sharding.AxisType.Explicit,))
  else:
    mesh = parallel.make_data_mesh(devices)
  options = dict(size=size, dtype=dtype, conv_impl=conv_impl, remat=remat)
  step = build_step(method, mesh, batch_per_chip=batch_per_chip, **options)
  start = time.perf_counter()
  lowered = step.fn.lower(*step.args)
  lower_s = time.perf_counter() - start
  mib = 2.0 ** 20
  row = Row(
      method=method, topology=topology, generation=gen, chips=len(devices), num_slices=num_slices,
      dtype=dtype, conv_impl=conv_impl, remat=remat or "none", batch_per_chip=batch_per_chip,
      global_batch=batch_per_chip * len(devices), lower_s=lower_s, compile_s=None,
      compile_cpu_s=None, argument_gib=None, output_gib=None, temp_gib=None, alias_gib=None,
      total_gib=None, hbm_gib=HBM_GIB[gen], fits=None, xla_gflop_per_item=None,
      analytic_gflop_per_item=analytic_flops(step) / batch_per_chip / 1e9,
      collectives={k: v / mib for k, v in lowered_collective_bytes(lowered).items()},
      compiled_collectives={}, unit=step.unit)
  if not compile:
    return row
  cpu = _cpu_seconds()
  start = time.perf_counter()
  compiled = lowered.compile()
  row.compile_s, row.compile_cpu_s = time.perf_counter() - start, _cpu_seconds() - cpu
  memory = memory_gib(compiled)
  flops = xla_flops(compiled)
  row = dataclasses.replace(
      row, **memory, fits=memory["total_gib"] <= HBM_GIB[gen],
      xla_gflop_per_item=None if flops is None else flops / batch_per_chip / 1e9,
      compiled_collectives={k: v / mib
                            for k, v in compiled_collective_bytes(compiled.as_text()).items()})
  if fit_batch:
    def fits(b: int) -> bool:
      try:
        _, probe, *_ = compile_step(build_step(method, mesh, batch_per_chip=b, **options))
      except jax.errors.JaxRuntimeError as e:
        if is_out_of_memory(e):
          return False
        raise
      fit = memory_gib(probe)["total_gib"] <= HBM_GIB[gen]
      logging.warning("%s %s: %d per chip %s", method, topology, b, "fits" if fit else "does not fit")
      return fit
    row.max_batch_per_chip = (largest_fitting_batch(fits, batch_per_chip) if row.fits else
                              0 if not fits(1) else largest_fitting_batch(fits, 1, granularity=1))
  return row


def markdown_table(rows: Sequence[Row]) -> str:
  def opt(value, fmt):
    return "n/a" if value is None else format(value, fmt)

  def mib(d: dict[str, float]) -> str:
    return "; ".join(f"{k} {v:,.2f}" for k, v in sorted(d.items())) or "n/a"

  lines = ["| method | topology | chips | dtype | convs | remat | per chip | lower s | compile s (CPU s) "
           "| args GiB | out GiB | temp GiB | aliased GiB | total GiB | HBM GiB | fits | max per chip "
           "| XLA GFLOP/item | 2·MAC GFLOP/item | collectives MiB/chip/step (lowered) "
           "| compiled collectives MiB/chip/step |",
           "|" + "---|" * 21]
  for r in rows:
    slices = f" ×{r.num_slices} slices" if r.num_slices > 1 else ""
    lines.append(
        f"| {r.method} | {r.topology}{slices} | {r.chips} | {r.dtype} | {r.conv_impl} | {r.remat} "
        f"| {r.batch_per_chip} {r.unit} | {r.lower_s:.1f} "
        f"| {opt(r.compile_s, '.0f')} ({opt(r.compile_cpu_s, '.0f')}) "
        f"| {opt(r.argument_gib, '.2f')} | {opt(r.output_gib, '.2f')} | {opt(r.temp_gib, '.2f')} "
        f"| {opt(r.alias_gib, '.2f')} | {opt(r.total_gib, '.2f')} | {r.hbm_gib:g} "
        f"| {'n/a' if r.fits is None else 'yes' if r.fits else 'NO'} "
        f"| {opt(r.max_batch_per_chip, 'd')} | {opt(r.xla_gflop_per_item, '.1f')} "
        f"| {opt(r.analytic_gflop_per_item, '.1f')} | {mib(r.collectives)} "
        f"| {mib(r.compiled_collectives)} |")
  return "\n".join(lines)


def write_tables(out: str, header: str, rows: Sequence[Row]) -> None:
  """out.md (header + table) and out.json (the rows), each replaced whole."""
  base = pathlib.Path(out)
  base.parent.mkdir(parents=True, exist_ok=True)
  for suffix, text in ((".md", header + "\n\n" + markdown_table(rows) + "\n"),
                       (".json", json.dumps({"header": header,
                                             "rows": [dataclasses.asdict(r) for r in rows]},
                                            indent=1) + "\n")):
    files.write_text_atomic(base.with_name(base.name + suffix), text)


_METHODS = flags.DEFINE_list("methods", ["glcnet"], f"Steps to compile, of {', '.join(METHODS)}.",
                             allow_override=True)
_TOPOLOGIES = flags.DEFINE_list("topologies", ["v5e:2x2", "v4:2x2x1", "v5p:2x2x1"],
                                "TPU topology names, generation:shape (v4, v5e, v5p, v6e).")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of each topology (multi-slice if > 1).")
_SIZE = flags.DEFINE_enum("size", "full", ["tiny", "full"], "Model and input size of the configs.",
                          allow_override=True)
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "model.dtype.")
_CONV = flags.DEFINE_enum("conv_impl", "plain", ["plain", "cpu"], "model.conv_impl.")
_REMAT = flags.DEFINE_string("remat", "", "model.remat (a jax.checkpoint_policies name, or '').")
_BATCH = flags.DEFINE_integer("batch_per_chip", 64, "Items (pairs or images) per chip.")
_FIT = flags.DEFINE_bool("fit_batch", False,
                         "Also find the largest per-chip batch that fits HBM (a compile per probe).")
_COMPILE = flags.DEFINE_bool("compile", True,
                             "Compile (minutes per step); without, only lower: collectives and 2·MACs.")
_OUT = flags.DEFINE_string("out", "", "Write OUT.md and OUT.json after every row.",
                           allow_override=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  unknown = [m for m in _METHODS.value if m not in METHODS]
  if unknown:
    sys.exit(f"error: --methods: unknown {unknown}; expected some of {', '.join(METHODS)}")
  try:
    for topology in _TOPOLOGIES.value:
      generation(topology)
  except ValueError as e:
    sys.exit(f"error: --topologies: {e}")
  header = (f"jax {jax.__version__}, libtpu {_libtpu_version()}, compiled on {_cpu_model()} "
            f"({os.cpu_count()} cores); size {_SIZE.value}")
  print(header, flush=True)
  rows = []
  for method in _METHODS.value:
    for topology in _TOPOLOGIES.value:
      row = measure(method, topology, num_slices=_SLICES.value, size=_SIZE.value,
                    dtype=_DTYPE.value, conv_impl=_CONV.value, remat=_REMAT.value,
                    batch_per_chip=_BATCH.value, fit_batch=_FIT.value, compile=_COMPILE.value)
      rows.append(row)
      print(f"{method} {topology}: lowered in {row.lower_s:.0f} s"
            + ("" if row.compile_s is None else
               f", compiled in {row.compile_s:.0f} s, {row.total_gib:.2f} GiB per chip"), flush=True)
      if _OUT.value:  # after every row, so a long run killed midway keeps its rows
        write_tables(_OUT.value, header, rows)
  print(markdown_table(rows))


def _libtpu_version() -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "not installed"


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


if __name__ == "__main__":
  app.run(main)
