"""A method's train step with our written-out gradients against autodiff's, in one process.

  python benchmarks/bench_backward_paths.py                     # full size, bf16, ×128 (a GPU)
  python benchmarks/bench_backward_paths.py --size tiny --dtype float32 --batch 8 \
      --variants autodiff,bn,resize,ours                         # a CPU, with attribution

On a GPU machine without grain or ml_collections, through the accelerator
check's wrapper, which installs the carried wheels first:

  ACCELERATOR_CHECK_SCRIPT=benchmarks/bench_backward_paths.py \
      bash benchmarks/accelerator_check.sh --budget_s 400 2>&1 | tee $OUT/bench.log

with output to a file or `tee` (not through a filter such as grep, which
holds its output back until the end) and a `--budget_s` under the call's
limit: at the budget the table holds what was measured and the process exits
without waiting for unfinished compiles. On an H200 two full-size steps
compiled side by side took 168 s after 43 s of tracing; four, traced in 44 s,
were not compiled by 264 s (80% of a 330-s budget), so ask for two variants
per call there.

Two layers have hand-written VJPs (glc_jax/models/layers.py): training
BatchNorm (`_batch_norm_train`) and the align-corners resize (`_resize_axis`).
Each variant (`--variants`, default autodiff,ours) below traces the same step
with some of them replaced by their undecorated forward (`custom_vjp.fun`),
which jax then differentiates itself, as the code did before 2026-11-28 on one
device (on several, the old code also cast the synchronised statistics to
device-varying so that their gradient summed in float32, which `.fun` does
not; time the variants on one device):

  autodiff   both by autodiff
  bn         our BatchNorm gradient, autodiff's resize
  resize     autodiff's BatchNorm, our resize gradient
  ours       both ours (what the library runs)
  onepass    ours, with BatchNorm's forward statistics from one pass of
             sums of x and x² (one read of x and one all-reduce instead of
             two each): a speed probe only, since about 0 these sums cancel
             where the mean is large beside the spread; the branch
             bn-one-pass-shift sums about the running mean instead

The variants are lowered one after another (the swap is process-wide), then
compiled side by side, and timed only once every compile has finished, in
interleaved rounds (autodiff, bn, resize, ours, autodiff, ...), so that load
that drifts falls on all of them alike. Before timing, each variant takes one
step from the same state and prints its loss, which should agree exactly on
the CPU backend (the forward passes are the same; on an H200 the two
programs' losses agreed to about 1e-6 relative; onepass computes its
statistics otherwise and differs by rounding), and its gradient norm,
which should agree to rounding. Prints a markdown table (median step time
over the rounds, items/s, XLA's memory estimate, that first step's gradient
norm) and writes it to $OUT/bench_backward_paths.md when OUT is set.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import platform
import statistics
import sys
import time
from unittest import mock

import jax

# name: (BatchNorm: 'autodiff', 'ours' or 'onepass'; our resize gradient)
VARIANTS = {"autodiff": ("autodiff", False), "bn": ("ours", False), "resize": ("autodiff", True),
            "ours": ("ours", True), "onepass": ("onepass", True)}


def _one_pass_batch_norm():
  """layers._batch_norm_train with its statistics from one pass of Σx and Σx², same gradient."""
  from glc_jax.models import layers  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def fwd(xg, scale, bias, epsilon, axis_name, dtype):
    xf = xg.astype(jnp.float32)
    axes = tuple(range(1, xg.ndim - 1))
    sums = (jnp.sum(xf, axes), jnp.sum(jnp.square(xf), axes))
    s1, s2 = sums if axis_name is None else jax.lax.psum(sums, axis_name)
    n = layers._group_count(xg, axis_name)  # pylint: disable=protected-access
    mean = s1 / n
    var = jnp.maximum(s2 / n - jnp.square(mean), 0.0)
    y = layers._normalise(xg, mean, var, scale, bias, epsilon, dtype)  # pylint: disable=protected-access
    return (y, mean, var, n), (xg, mean, var, n, scale)

  one_pass = jax.custom_vjp(lambda *args: fwd(*args)[0], nondiff_argnums=(3, 4, 5))
  one_pass.defvjp(fwd, layers._batch_norm_train_bwd)  # pylint: disable=protected-access
  return one_pass


@contextlib.contextmanager
def gradients(bn: str, resize: bool):
  """Traces with autodiff's, our, or our one-pass BatchNorm, and our resize gradient where True."""
  from glc_jax.models import layers  # pylint: disable=import-outside-toplevel
  with contextlib.ExitStack() as stack:
    if bn != "ours":
      stack.enter_context(mock.patch.object(
          layers, "_batch_norm_train", _one_pass_batch_norm() if bn == "onepass"
          else layers._batch_norm_train.fun))  # pylint: disable=protected-access
    if not resize:
      stack.enter_context(mock.patch.object(layers, "_resize_axis",
                                            layers._resize_axis.fun))  # pylint: disable=protected-access
    yield


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="glcnet")
  parser.add_argument("--size", default="full", choices=["tiny", "full"])
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--batch", type=int, default=128, help="per-device batch")
  parser.add_argument("--conv_impl", default="auto")
  parser.add_argument("--variants", default="autodiff,ours",
                      help=f"comma-separated, of {', '.join(VARIANTS)}")
  parser.add_argument("--budget_s", type=float, default=300.0,
                      help="the whole run; compiles unfinished by 80%% of it are dropped")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=5, help="steps per variant and round")
  args = parser.parse_args()
  from glc_jax.benchmark import throughput  # pylint: disable=import-outside-toplevel

  names = args.variants.split(",")
  t0 = time.perf_counter()
  elapsed = lambda: time.perf_counter() - t0  # noqa: E731
  say = lambda msg: print(f"[{elapsed():6.1f} s] {msg}", flush=True)  # noqa: E731
  device = jax.local_devices()[0]
  say(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
      f"{args.method} {args.size} {args.dtype} ×{args.batch} conv={args.conv_impl}")
  lowered, state, batch, rng, items = {}, None, None, None, 0
  host = throughput.host_batch(args.method, throughput.step_config(
      args.method, args.size, args.dtype, args.conv_impl), args.batch)
  for name in names:
    with gradients(*VARIANTS[name]):
      step, state, batch, rng, items = throughput.build_step(
          args.method, args.size, 1, args.dtype, args.batch, conv_impl=args.conv_impl,
          host=host, state=state)
      lowered[name] = step.lower(state, batch, rng)
    say(f"lowered {name}")
  pool = concurrent.futures.ThreadPoolExecutor(len(names))
  def compile_timed(low):
    start = time.perf_counter()
    return low.compile(), time.perf_counter() - start

  jobs = {name: pool.submit(compile_timed, low) for name, low in lowered.items()}
  compiled, compile_s = {}, {}
  concurrent.futures.wait(jobs.values(), timeout=max(0.0, 0.8 * args.budget_s - elapsed()))
  for name, job in jobs.items():
    if job.done():
      compiled[name], compile_s[name] = job.result()
      say(f"compiled {name} ({compile_s[name]:.0f} s, side by side)")
    else:
      say(f"dropped {name}: not compiled by 80% of --budget_s")
  names = [n for n in names if n in compiled]
  first = {}
  for name in names:
    _, metrics = compiled[name](jax.tree.map(jax.numpy.copy, state), batch, rng)
    first[name] = (float(metrics["loss"]), float(metrics["grad_norm"]))
  say("first step (loss, grad norm): " + "; ".join(
      f"{n} {loss:.6f}, {norm:.6f}" for n, (loss, norm) in first.items()))
  times = {name: [] for name in names}
  for _ in range(args.rounds):
    if elapsed() > 0.95 * args.budget_s:
      say("budget spent: fewer rounds")
      break
    for name in names:
      state, _ = compiled[name](state, batch, rng)  # warm-up, and the donated state back
      jax.block_until_ready(state)
      start = time.perf_counter()
      for _ in range(args.steps):
        state, _ = compiled[name](state, batch, rng)
      jax.block_until_ready(state)
      times[name].append((time.perf_counter() - start) / args.steps)
  names = [n for n in names if times[n]]
  lines = [f"## Backward paths: {args.method} {args.size} {args.dtype} ×{args.batch} "
           f"conv={args.conv_impl} on {device.device_kind} ({jax.default_backend()}), "
           f"{platform.node()}, jax {jax.__version__}",
           "",
           f"median of {len(times[names[0]]) if names else 0} interleaved rounds of "
           f"{args.steps} steps; compile s (side by side): "
           + ", ".join(f"{n} {compile_s[n]:.0f}" for n in names),
           "",
           "| variant | BatchNorm | resize grad | step s | items/s | vs autodiff "
           "| XLA MiB | first grad norm |",
           "|---|---|---|---|---|---|---|---|"]
  base = statistics.median(times["autodiff"]) if "autodiff" in names else None
  for name in names:
    step_s = statistics.median(times[name])
    bn, resize = VARIANTS[name]
    mib = throughput.xla_footprint_mib(compiled[name])
    lines.append(f"| {name} | {bn} | {'ours' if resize else 'autodiff'} "
                 f"| {step_s:.4f} | {items / step_s:.1f} "
                 f"| {f'{base / step_s:.3f}×' if base else 'n/a'} "
                 f"| {'n/a' if mib is None else f'{mib:.0f}'} | {first[name][1]:.6f} |")
  lines.append("")
  lines.append("per-round step s: " + "; ".join(
      f"{n} " + ", ".join(f"{t:.4f}" for t in times[n]) for n in names))
  table = "\n".join(lines)
  print(table)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "bench_backward_paths.md"), "w") as f:
      f.write(table + "\n")
  sys.stdout.flush()
  # Compiles still running in the pool's threads are abandoned, not awaited.
  os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  main()
