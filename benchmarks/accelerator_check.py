"""The prepared accelerator check (issue 12): train-step throughput, kernel paths, compile
times and the host input pipeline, in one time-boxed run. Started by
benchmarks/accelerator_check.sh, which installs the carried wheels first.

  python benchmarks/accelerator_check.py              # full size, 64 and 128 per device
  python benchmarks/accelerator_check.py --smoke      # tiny model and sizes (a CPU run-through)

Phases, each with its own deadline inside --budget_s (the whole run ends by then):
  1. host pipeline: GLCNet pairs (224² views of 256² 4-band tiles, 4 patches of
     48) through the Grain pipeline with --workers processes (default: every
     core), pairs/s, then in this process on one core; skipped with the reason
     when grain cannot be imported.
  2. compile: each case (method × dtype × per-device batch, plus GLCNet with
     the 'cpu' kernels) is lowered here and compiled by --compile_threads
     threads, most important first; the real initial state of each method is
     built alongside. No compile starts after --compile_until; those started are
     awaited until --settle_until, since a compile beside a timed step slows it
     (host cores; on a GPU, autotuning runs kernels on the device). Cases not
     compiled by then are listed as such; a step timed beside one is flagged.
  3. time: each compiled case runs --warmup untimed and --steps timed steps on
     one device; pairs/s, step time, MFU against the device's dense bf16 peak,
     XLA's per-device footprint and the allocator's peak so far.
  4. profile: --profile_steps of the first case run under jax.profiler, after
     every timing; its device time by thread (busy vs span) and op kind goes
     into the report, the trace (Chrome/Perfetto JSON) to $OUT.
Then the tables: throughput, conv paths (plain vs cpu), compile times, host
pipeline next to the step, the profile. Every line is printed as soon as it is known, and
the tables also go to --out (default $OUT/accelerator_check.md when OUT is set). The
compilation cache is runs/accelerator_check/jax_cache under the folder it is started from
(the repository root on the device machine), so that a rerun on a warm machine reuses it.
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import pathlib
import platform
import queue
import re
import shutil
import sys
import threading
import time
import traceback

import numpy as np

START = time.perf_counter()
METHODS = ("glcnet", "simclr", "mocov2", "finetune")
DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class Case:
  method: str
  dtype: str
  batch: int
  conv_impl: str = "plain"

  def __str__(self):
    return f"{self.method} {self.dtype} ×{self.batch} conv={self.conv_impl}"


def cases_by_priority(batches: tuple[int, ...], dtypes: tuple[str, ...] = DTYPES) -> list[Case]:
  """GLCNet in the first dtype at the first batch (bfloat16 ×128: the issue's goal), its
  'cpu'-kernel twin, the other methods likewise, then the rest; a time box cuts from the end."""
  dtype, big = dtypes[0], batches[0]
  first = [Case("glcnet", dtype, big), Case("glcnet", dtype, big, "cpu")]
  first += [Case(m, dtype, big) for m in METHODS[1:]]
  rest = [Case(m, d, b) for d in dtypes for b in batches for m in METHODS]
  return first + [c for c in rest if c not in first]


def elapsed() -> float:
  return time.perf_counter() - START


def say(*parts) -> None:
  print(f"[{elapsed():6.1f} s]", *parts, flush=True)


class Jobs:
  """Daemon worker threads over a FIFO of named jobs; results by name (XLA compiles release
  the GIL, so compiles run side by side; daemon threads never hold up the exit)."""

  def __init__(self, threads: int, on_done=None):
    self._queue: queue.Queue = queue.Queue()
    self.results: dict = {}
    self._running: set = set()  # names; results can be popped, so they cannot tell
    self._starts = 0
    self._done = threading.Condition()
    self._on_done = on_done
    for _ in range(threads):
      threading.Thread(target=self._work, daemon=True).start()

  def submit(self, name, fn) -> None:
    self._queue.put((name, fn))

  def _work(self):
    while True:
      name, fn = self._queue.get()
      with self._done:
        self._running.add(name)
        self._starts += 1
      start = time.perf_counter()
      try:
        value, error = fn(), None
      except Exception as e:  # pylint: disable=broad-except
        value, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      result = (value, error, time.perf_counter() - start)
      with self._done:
        self._running.discard(name)
        self.results[name] = result
        self._done.notify_all()
      if self._on_done is not None:  # the result itself: the main thread may pop it
        self._on_done(name, *result)

  def wait(self, name, deadline: float):
    """(value, error, seconds) of a job, or None if it is not done by `deadline` (elapsed s)."""
    with self._done:
      while name not in self.results:
        left = deadline - elapsed()
        if left <= 0:
          return None
        self._done.wait(min(left, 1.0))
      return self.results[name]

  def drop_pending(self, keep=lambda name: False) -> list:
    """Takes the jobs no worker has started off the queue, except those `keep` names; returns
    the names of those dropped."""
    dropped, kept = [], []
    while True:
      try:
        job = self._queue.get_nowait()
      except queue.Empty:
        break
      (kept if keep(job[0]) else dropped).append(job)
    for job in kept:
      self._queue.put(job)
    return [name for name, _ in dropped]

  def activity(self) -> tuple[int, int]:
    """(jobs running now, jobs started so far)."""
    with self._done:
      return len(self._running), self._starts


def host_pipeline_rate(args, workers: int, seconds: float) -> tuple[float | None, str]:
  """(pairs/s of the Grain pipeline with `workers` processes, 0: in this process, note)."""
  try:
    from glc_jax.data import pipelines  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return None, f"not measured: {e} (carry the wheels: benchmarks/fetch_accelerator_wheels.sh)"
  view, patch = (96, 16) if args.smoke else (224, 48)
  rng = np.random.default_rng(0)
  tiles = [{"image": rng.integers(0, 256, (256, 256, 4), dtype=np.uint8)} for _ in range(64)]
  example_fn = pipelines.recipe_for("glcnet", dict(view_size=view, patch_size=patch, patch_num=4),
                                    dataset={"norm": {"mode": "reference"}, "value_max": 255.0})
  batch = 32
  ds = pipelines.train_dataset(tiles, example_fn, batch_size=batch, seed=0, process_index=0,
                               process_count=1)
  it = pipelines.make_iterator(ds, num_workers=workers)
  deadline = elapsed() + seconds
  try:
    # The first batches pay for the workers' start; time from the second round on.
    for _ in range(max(2, workers)):
      next(it)
    if elapsed() > deadline:
      return None, f"not measured: the {workers} workers took the whole time box to start"
    start, pairs = time.perf_counter(), 0
    while elapsed() < deadline:
      next(it)
      pairs += batch
    rate = pairs / (time.perf_counter() - start)
  finally:
    it.close()
  who = f"{workers} workers" if workers else "in-process, one core"
  return rate, f"{who}, {view}² views, 4 patches of {patch}, batch {batch}"


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny model and sizes")
  parser.add_argument("--batches", default="",
                      help="per-device batches, largest first (default 128,64; smoke 4,2)")
  parser.add_argument("--dtypes", default=",".join(DTYPES), help="compute dtypes, first first")
  parser.add_argument("--budget_s", type=float, default=450.0,
                      help="the whole run, from start to the last table")
  parser.add_argument("--pipeline_s", type=float, default=0.0,
                      help="host pipeline time box (default 8%% of the budget)")
  parser.add_argument("--compile_until", type=float, default=0.62,
                      help="fraction of the budget after which no compile starts")
  parser.add_argument("--settle_until", type=float, default=0.85,
                      help="fraction of the budget until which started compiles are awaited "
                           "before any step is timed")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  parser.add_argument("--compile_threads", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--profile_steps", type=int, default=3,
                      help="steps of the first case traced with jax.profiler (0: none)")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  args.pipeline_s = args.pipeline_s or 0.08 * args.budget_s
  out = args.out or (os.path.join(os.environ["OUT"], "accelerator_check.md")
                     if os.environ.get("OUT") else "")
  report = Report(out)
  try:
    run(args, report)
  except KeyboardInterrupt:
    say("interrupted: tables below hold what was measured")
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    say("failed: tables below hold what was measured")
  report.write(final=True)
  sys.stdout.flush()
  # Compiles still running in daemon threads are abandoned, not awaited.
  os._exit(0)  # pylint: disable=protected-access


class Report:
  """Everything measured so far, as markdown tables; rewritten to `path` after each change."""

  def __init__(self, path: str):
    self.path = path
    self.header: list[str] = []
    self.rows: list = []
    self.compiles: dict[Case, tuple[float, float | None, str | None]] = {}
    self.skipped: dict[Case, str] = {}
    self.disturbed: dict[Case, int] = {}  # cases timed beside running compiles: how many
    self.profile: str = ""  # where the first case's device time goes
    self.pipeline: tuple[float | None, str] | None = None
    self.pipeline_one_core: tuple[float | None, str] | None = None

  def tables(self) -> str:
    from glc_jax.benchmark import throughput  # pylint: disable=import-outside-toplevel
    parts = ["\n".join(self.header)]
    results = [r for _, r in self.rows]
    if results:
      parts.append("### Throughput (one device)\n\n" + throughput.markdown_table(results)
                   + self._disturbed_note())
    parts.append(self._conv_table())
    parts.append(self._compile_table())
    parts.append(self._pipeline_line())
    parts.append(self.profile)
    return "\n\n".join(p for p in parts if p) + "\n"

  def _disturbed_note(self) -> str:
    if not self.disturbed:
      return ""
    cases = ", ".join(f"{c} (beside {n})" for c, n in self.disturbed.items())
    return (f"\n\nTimed while compiles or state builds still ran, so slower than alone: "
            f"{cases}. A larger --budget_s or fewer --dtypes/--batches gives clean figures.")

  def _conv_table(self) -> str:
    by_case = {case: r for case, r in self.rows}
    pairs = [(c, dataclasses.replace(c, conv_impl="plain")) for c in by_case if c.conv_impl == "cpu"]
    lines = []
    for cpu, plain in pairs:
      for case in (plain, cpu):
        r, comp = by_case.get(case), self.compiles.get(case)
        if r is None:
          lines.append(f"| {case.conv_impl} | not timed | | | {_fmt(comp and comp[1], '.1f')} |")
          continue
        lines.append(f"| {case.conv_impl} | {r.step_s:.4f} | {r.items_per_s:.1f} "
                     f"| {_fmt(r.xla_mib, '.0f')} | {_fmt(comp and comp[1], '.1f')} |")
    if not lines:
      return ""
    case = pairs[0][1]
    return (f"### Conv paths: {case.method} {case.dtype} ×{case.batch}\n\n"
            "| conv_impl | step s | pairs/s | XLA MiB | compile s |\n|---|---|---|---|---|\n"
            + "\n".join(lines))

  def _compile_table(self) -> str:
    lines = [f"| {c} | {lower:.1f} | {_fmt(comp, '.1f')} | {err or ''} |"
             for c, (lower, comp, err) in self.compiles.items()]
    lines += [f"| {c} | | | {why} |" for c, why in self.skipped.items()]
    if not lines:
      return ""
    return ("### Compile times (lower in the main thread; compiles side by side)\n\n"
            "| case | lower s | compile s | note |\n|---|---|---|---|\n" + "\n".join(lines))

  def _pipeline_line(self) -> str:
    if self.pipeline is None:
      return ""
    rate, note = self.pipeline
    step = [r for c, r in self.rows if c.method == "glcnet" and c.conv_impl == "plain"]
    best = max(step, key=lambda r: r.items_per_s) if step else None
    line = "### Host pipeline vs step\n\n"
    line += (f"host pipeline: {rate:.0f} pairs/s ({note})" if rate is not None
             else f"host pipeline: {note}")
    if best is not None:
      line += (f"; GLCNet step: {best.items_per_s:.0f} pairs/s ({best.dtype}, "
               f"{best.global_batch} per device)")
      if rate is not None:
        verdict = ("the host keeps up" if rate >= best.items_per_s else
                   f"the host feeds {rate / best.items_per_s:.0%} of what the step takes")
        line += f": {verdict}"
    one, one_note = self.pipeline_one_core or (None, "")
    if one is not None:
      line += f"\n\nin-process, one core: {one:.0f} pairs/s"
      if rate is not None:
        line += f"; the workers give {rate / one:.1f}× that"
    elif one_note:
      line += f"\n\nin-process, one core: {one_note}"
    return line

  def write(self, final: bool = False) -> None:
    text = self.tables()
    if self.path:
      path = pathlib.Path(self.path)
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
    if final:
      print("\n" + text, flush=True)


def _fmt(value, spec) -> str:
  return "n/a" if value is None else format(value, spec)


def run(args, report: Report) -> None:
  budget = args.budget_s
  report.header.append(f"## Accelerator check, {time.strftime('%Y-%m-%d %H:%M %Z')}")
  report.header.append(f"host: {platform.node()}, {os.cpu_count()} cores, Python "
                       f"{platform.python_version()}")
  say(report.header[-1])
  # Before jax touches the device: the workers are forked from a process without it.
  # Then in-process: one core's rate tells the workers' scaling apart from the host's
  # per-core speed (on an H200's host 16 workers gave half a development core's rate). The
  # in-process run tunes this process's malloc (augment.tune_allocator), which then holds
  # for the compile and time phases too; steps run on the device, so their times do not move.
  runs = [(args.workers, 0.7), (0, 0.3)] if args.workers > 1 else [(args.workers, 1.0)]
  for workers, share in runs:
    who = f"{workers} workers" if workers else "in-process, one core"
    say(f"host pipeline: up to {share * args.pipeline_s:.0f} s, {who}")
    try:
      result = host_pipeline_rate(args, workers, share * args.pipeline_s)
    except Exception as e:  # pylint: disable=broad-except
      result = (None, f"failed: {type(e).__name__}: {e}")
    say("host pipeline:", result[1] if result[0] is None else f"{result[0]:.0f} pairs/s ({result[1]})")
    if workers == 0 and len(runs) > 1:
      report.pipeline_one_core = result
    else:
      report.pipeline = result

  import jax  # pylint: disable=import-outside-toplevel
  cache = pathlib.Path("runs/accelerator_check/jax_cache").resolve()
  jax.config.update("jax_compilation_cache_dir", str(cache))
  from glc_jax import parallel  # pylint: disable=import-outside-toplevel
  from glc_jax.benchmark import throughput  # pylint: disable=import-outside-toplevel

  device = jax.local_devices()[0]
  peak = throughput.device_peak_tflops(device)
  report.header.append(
      f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
      f"{'smoke (tiny model)' if args.smoke else 'full ResNet-50 DeepLabv3+'}; MFU vs "
      + (f"{peak:g} TFLOP/s dense bf16" if peak else "n/a (unknown peak)")
      + f"; persistent compilation cache {cache} (a rerun on the same machine reads it)")
  say(report.header[-1])
  report.write()

  size = "tiny" if args.smoke else "full"
  batches = tuple(int(b) for b in (args.batches or ("4,2" if args.smoke else "128,64")).split(","))
  cases = cases_by_priority(batches, tuple(args.dtypes.split(",")))
  def done(name, _, error, seconds):
    say(f"{name[0]} {name[1]}: {seconds:.1f} s" + (f", {error}" if error else ""))

  jobs = Jobs(args.compile_threads, on_done=done)
  compile_deadline = args.compile_until * budget
  hosts: dict = {}
  state_shapes: dict = {}
  traced: dict = {}
  lowered_at: dict[Case, float] = {}
  for case in cases:
    if elapsed() > compile_deadline - 10:
      report.skipped[case] = "not lowered: compile time box spent"
      continue
    key = (case.method, case.batch)
    if key not in hosts:
      config = throughput.step_config(case.method, size, case.dtype)
      hosts[key] = throughput.host_batch(case.method, config, case.batch)
    start = time.perf_counter()
    step, state, batch, rng, _ = throughput.build_step(
        case.method, size, 1, case.dtype, case.batch, shapes_only=True,
        conv_impl=case.conv_impl, host=hosts[key], state=state_shapes.get(case.method))
    lowered = step.lower(state, batch, rng)
    lowered_at[case] = time.perf_counter() - start
    jobs.submit(("compile", case), lowered.compile)
    say(f"lowered {case} in {lowered_at[case]:.1f} s; compiling")
    if case.method not in state_shapes:
      state_shapes[case.method] = state
      jobs.submit(("init", case.method), _initial_state(throughput, case, size, hosts[key]))
      traced[case.method] = (case.batch, step, state, batch, rng)

  # While the compiles run. Per item the FLOPs do not depend on dtype, kernels or (to within
  # the N² loss terms) batch, so one count per method serves all its cases.
  flops_per_item = {m: throughput.step_flops(*args, 1) / b for m, (b, *args) in traced.items()}

  # No compile starts after the compile deadline. Those started are awaited until the settle
  # deadline because a compile running beside a timed step distorts it: it takes host cores,
  # and on a GPU XLA autotunes by running candidate kernels on the device (a MoCo v2 step
  # measured 3.2x slower beside three compiles than alone on an H200).
  for case in lowered_at:
    jobs.wait(("compile", case), compile_deadline)
  dropped = set(jobs.drop_pending(keep=lambda name: name[0] == "init"))
  live = {c.method for c in lowered_at if ("compile", c) not in dropped}
  jobs.drop_pending(keep=lambda name: name[1] in live)  # states no compiled case will use
  settle_deadline = args.settle_until * budget
  for case, lower_s in lowered_at.items():
    done = None if ("compile", case) in dropped else jobs.wait(("compile", case), settle_deadline)
    if done is None:
      report.compiles[case] = (lower_s, None, "not compiled by the time box")
      continue
    _, error, seconds = done
    report.compiles[case] = (lower_s, seconds, error)
    report.write()
  for method in live:  # the initial states too: their builds run on the device
    jobs.wait(("init", method), settle_deadline)

  states: dict = {}
  time_deadline = 0.96 * budget
  mesh = parallel.make_data_mesh(jax.local_devices()[:1])
  for case in cases:
    if case not in report.compiles or report.compiles[case][1] is None:
      continue
    if report.compiles[case][2]:
      continue
    if elapsed() > time_deadline - 5:
      report.skipped[case] = "compiled, not timed: time box spent"
      continue
    state = states.pop(case.method, None)
    if state is None:
      done = jobs.wait(("init", case.method), time_deadline)
      if done is None or done[1]:
        report.skipped[case] = "no initial state" + (f": {done[1]}" if done else " in time")
        continue
      state = done[0]
      jobs.results.pop(("init", case.method))
    compiled = jobs.results[("compile", case)][0]
    host = hosts[(case.method, case.batch)]
    batch = parallel.shard_host_batch(host, mesh)
    running, starts = jobs.activity()
    try:
      step_s, state = throughput.time_compiled(compiled, state, batch, jax.random.key(0),
                                               args.warmup, args.steps)
    except Exception as e:  # pylint: disable=broad-except
      report.skipped[case] = f"step failed: {type(e).__name__}: {str(e).splitlines()[0]}"
      say(f"{case}: {report.skipped[case]}")
      # The step may have consumed the state (donated buffers); the method's next case,
      # a smaller batch after an out-of-memory say, needs a fresh one.
      jobs.submit(("init", case.method), _initial_state(throughput, case, size, host))
      continue
    beside = running + jobs.activity()[1] - starts
    if beside:
      report.disturbed[case] = beside
      say(f"{case}: timed beside {beside} compiles or state builds")
    states[case.method] = state
    total = flops_per_item[case.method] * case.batch
    result = throughput.Result(
        case.method, 1, case.dtype, case.batch, step_s, case.batch / step_s, total / case.batch / 1e9,
        total / step_s / (peak * 1e12) if peak else None, throughput.xla_footprint_mib(compiled),
        throughput.peak_in_use_mib(jax.local_devices()[:1]), report.compiles[case][1],
        case.conv_impl)
    report.rows.append((case, result))
    mfu = "" if result.mfu is None else f", MFU {100 * result.mfu:.1f}%"
    say(f"{case}: {step_s:.4f} s/step, {result.items_per_s:.1f} items/s{mfu}")
    report.write()

  # Last, so that tracing (which runs XLA's command buffers op by op) touches no timed step.
  first = cases[0]
  if args.profile_steps:
    state = states.get(first.method)
    if not any(c == first for c, _ in report.rows) or state is None:
      report.profile = f"### Profile of {first}\n\nnot taken: the case was not timed"
    elif elapsed() > budget - 30:
      report.profile = f"### Profile of {first}\n\nnot taken: under 30 s of the budget left"
    else:
      batch = parallel.shard_host_batch(hosts[(first.method, first.batch)], mesh)
      report.profile = _profile(args, first, jobs.results[("compile", first)][0], state, batch)
    say(report.profile.splitlines()[-1] if "not taken" in report.profile else "profile done")


def _profile(args, case: Case, compiled, state, batch) -> str:
  """Traces --profile_steps steps of `case` with jax.profiler; returns the report's section
  (device time by thread and op kind) and copies the trace to $OUT when it fits. Without HLO
  protos or Python tracing: they would serialise every compiled step at the trace's end."""
  import jax  # pylint: disable=import-outside-toplevel
  title = f"### Profile of {case}: {args.profile_steps} steps"
  folder = pathlib.Path("runs/accelerator_check/profile")
  shutil.rmtree(folder, ignore_errors=True)
  options = jax.profiler.ProfileOptions()
  options.enable_hlo_proto, options.python_tracer_level = False, 0
  try:
    jax.profiler.start_trace(str(folder), profiler_options=options)
  except Exception as e:  # pylint: disable=broad-except
    return f"{title}\n\nnot taken: start_trace failed: {type(e).__name__}: {e}"
  start = time.perf_counter()
  try:
    for _ in range(args.profile_steps):
      state, metrics = compiled(state, batch, jax.random.key(0))
      jax.block_until_ready(metrics["loss"])
    traced_s = (time.perf_counter() - start) / args.profile_steps
  finally:
    jax.profiler.stop_trace()
  traces = sorted(folder.rglob("*.trace.json.gz"))
  if not traces:
    return f"{title}\n\nno trace was written under {folder}"
  title += f", {traced_s:.4f} s per step while traced"
  try:
    if os.environ.get("OUT") and traces[-1].stat().st_size <= 16 << 20:
      shutil.copy(traces[-1], pathlib.Path(os.environ["OUT"]) / "profile_trace.json.gz")
  except OSError as e:
    title += f" (trace not copied: {e})"
  try:
    with gzip.open(traces[-1], "rt") as f:
      events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    return (f"{title}; device time by thread and op kind\n\n"
            + profile_tables(events, host_fallback=jax.default_backend() == "cpu"))
  except Exception as e:  # pylint: disable=broad-except
    return f"{title}\n\nthe trace could not be read: {type(e).__name__}: {e}"


def profile_tables(events: list, top: int = 12, threads: int = 3,
                   host_fallback: bool = True) -> str:
  """Markdown: for the busiest `threads` threads of the device processes ('/device:GPU…',
  '/device:TPU…'; the host's when there are none, as on a CPU), the total duration of
  complete events and the `top` op kinds (names less a trailing instance number: every
  'fusion.N' is one kind) by summed duration with their share. Per thread, because one
  device's threads (streams, XLA ops, modules) can hold the same time twice."""
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  thread_names = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
                  if e.get("ph") == "M" and e.get("name") == "thread_name"}
  device = {pid for pid, n in names.items() if n.startswith(("/device:GPU", "/device:TPU"))}
  if not device and host_fallback:
    device = {pid for pid, n in names.items() if n.startswith("/host")}
  by_thread: dict = {}
  spans: dict = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device and float(e.get("dur", 0.0)) > 0:
      key = (e["pid"], e.get("tid"))
      ops = by_thread.setdefault(key, {})
      kind = re.sub(r"[._]\d+$", "", e.get("name", "?"))
      ops[kind] = ops.get(kind, 0.0) + float(e["dur"])
      spans.setdefault(key, []).append((float(e.get("ts", 0.0)), float(e["dur"])))
  if not by_thread:
    return ("no device events in the trace (no GPU/TPU plane: was the device profiler, "
            "CUPTI on a GPU, available?)")
  busiest = sorted(by_thread, key=lambda k: -sum(by_thread[k].values()))[:threads]
  parts = []
  for key in busiest:
    ops = by_thread[key]
    total = sum(ops.values())
    busy, span = _busy_and_span(spans[key])
    label = f"{names.get(key[0], key[0])} / {thread_names.get(key, key[1])}"
    lines = [f"| {name[:80]} | {us / 1e3:.2f} | {100 * us / total:.1f}% |"
             for name, us in sorted(ops.items(), key=lambda kv: -kv[1])[:top]]
    parts.append(f"{label}: busy {busy / 1e3:.1f} of {span / 1e3:.1f} ms "
                 f"({100 * busy / span:.0f}%); {total / 1e3:.1f} ms of events in "
                 f"{len(ops)} op kinds\n\n"
                 "| op kind | ms | share |\n|---|---|---|\n" + "\n".join(lines))
  return "\n\n".join(parts)


def _busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
  """(time covered by the union of (start, duration) intervals, first start to last end):
  idle gaps between a device's kernels are time the step spends on neither."""
  intervals = sorted(intervals)
  busy, end = 0.0, -float("inf")
  for start, dur in intervals:
    if start + dur > end:
      busy += start + dur - max(start, end)
      end = start + dur
  return busy, max(s + d for s, d in intervals) - intervals[0][0]


def _initial_state(throughput, case: Case, size: str, host):
  """A job building a method's real initial train state on the device. Any of its cases'
  will do: parameters and optimiser state are float32 and the same tree whatever the compute
  dtype, kernels or batch."""
  def build():
    _, state, *_ = throughput.build_step(case.method, size, 1, case.dtype, case.batch,
                                         conv_impl=case.conv_impl, host=host)
    return state
  return build


if __name__ == "__main__":
  sys.exit(main())
