"""benchmarks/accelerator_check.py's bookkeeping: which cases, in what order, the time-boxed
job queue, and the host-vs-step verdict (the run itself needs an accelerator to mean much;
`bash benchmarks/accelerator_check.sh --smoke` runs it through on a CPU)."""
import importlib.util
import itertools
import pathlib
import sys
import threading

from glc_jax.benchmark import throughput

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "accelerator_check.py"
_spec = importlib.util.spec_from_file_location("accelerator_check", _PATH)
check = importlib.util.module_from_spec(_spec)
sys.modules["accelerator_check"] = check  # its dataclasses look their module up by name
_spec.loader.exec_module(check)


def test_cases_cover_the_table_once_with_glcnet_bf16_and_its_cpu_twin_first():
  cases = check.cases_by_priority((128, 64))
  assert len(cases) == len(set(cases))
  plain = {(c.method, c.dtype, c.batch) for c in cases if c.conv_impl == "plain"}
  assert plain == set(itertools.product(("glcnet", "simclr", "mocov2", "finetune"),
                                        ("bfloat16", "float32"), (128, 64)))
  assert cases[:2] == [check.Case("glcnet", "bfloat16", 128, "plain"),
                       check.Case("glcnet", "bfloat16", 128, "cpu")]
  assert [c.conv_impl for c in cases].count("cpu") == 1
  # Every method is timed at least once before any float32 or small-batch case.
  assert {c.method for c in cases[:5]} == {"glcnet", "simclr", "mocov2", "finetune"}


def test_jobs_run_side_by_side_and_waiting_is_time_boxed():
  jobs = check.Jobs(2)
  release = threading.Event()
  jobs.submit("blocked", release.wait)
  jobs.submit("quick", lambda: 7)
  jobs.submit("broken", lambda: 1 / 0)
  assert jobs.wait("quick", check.elapsed() + 10)[:2] == (7, None)
  assert jobs.wait("blocked", check.elapsed() + 0.2) is None
  assert jobs.wait("broken", check.elapsed() + 10)[1].startswith("ZeroDivisionError")
  release.set()
  assert jobs.wait("blocked", check.elapsed() + 10)[1] is None


def test_only_unstarted_jobs_are_dropped_and_kept_ones_still_run():
  jobs = check.Jobs(1)
  started, release = threading.Event(), threading.Event()
  jobs.submit(("compile", "a"), lambda: (started.set(), release.wait()))
  assert started.wait(10)
  jobs.submit(("compile", "b"), lambda: 1)
  jobs.submit(("init", "glcnet"), lambda: 2)
  assert jobs.drop_pending(keep=lambda name: name[0] == "init") == [("compile", "b")]
  assert jobs.activity() == (1, 1)  # "a" runs; the kept init waits for the one worker
  release.set()
  assert jobs.wait(("init", "glcnet"), check.elapsed() + 10)[0] == 2
  jobs.results.pop(("init", "glcnet"))  # as the timing phase takes a state
  assert jobs.activity() == (0, 2)
  assert ("compile", "b") not in jobs.results


def test_report_flags_steps_timed_beside_running_compiles(tmp_path):
  report = check.Report(str(tmp_path / "check.md"))
  quiet, noisy = check.Case("glcnet", "bfloat16", 128), check.Case("mocov2", "bfloat16", 128)
  report.rows = [(quiet, _result(quiet, 0.08)), (noisy, _result(noisy, 0.15))]
  assert "slower than alone" not in report.tables()
  report.disturbed[noisy] = 3
  note = report.tables().split("slower than alone: ")[1].split(". ")[0]
  assert note == "mocov2 bfloat16 ×128 conv=plain (beside 3)"


def _result(case, step_s):
  return throughput.Result(case.method, 1, case.dtype, case.batch, step_s, case.batch / step_s,
                           131.7, None, None, None, 60.0, case.conv_impl)


def test_report_sets_the_host_pipeline_beside_the_fastest_glcnet_step(tmp_path):
  report = check.Report(str(tmp_path / "check.md"))
  plain = check.Case("glcnet", "bfloat16", 128)
  cpu = check.Case("glcnet", "bfloat16", 128, "cpu")
  report.rows = [(plain, _result(plain, 0.05)), (cpu, _result(cpu, 0.08))]  # 2560 and 1600 /s
  report.compiles = {plain: (3.0, 60.0, None), cpu: (4.0, 90.0, None)}
  report.pipeline = (1280.0, "16 workers")
  report.write()
  text = (tmp_path / "check.md").read_text()
  assert "host pipeline: 1280 pairs/s (16 workers); GLCNet step: 2560 pairs/s" in text
  assert "the host feeds 50% of what the step takes" in text
  assert "| plain | 0.0500 | 2560.0 | n/a | 60.0 |" in text
  assert "| cpu | 0.0800 | 1600.0 | n/a | 90.0 |" in text
  report.pipeline = (3000.0, "16 workers")
  assert "the host keeps up" in report.tables()
  report.pipeline = (None, "not measured: No module named 'grain'")
  assert "host pipeline: not measured: No module named 'grain'" in report.tables()
  report.pipeline, report.pipeline_one_core = (1280.0, "16 workers"), (160.0, "in-process")
  assert "in-process, one core: 160 pairs/s; the workers give 8.0× that" in report.tables()


def test_profile_tables_sum_device_time_per_thread_and_op():
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "Stream #13"}},
          {"ph": "M", "name": "thread_name", "pid": 7, "tid": 2, "args": {"name": "Stream #14"}}]
  # (pid, tid, name, start µs, duration µs); fusion_1 overlaps convolution.12 by 100 µs.
  ops = [(7, 1, "convolution.3", 0, 600.0), (7, 1, "convolution.12", 1000, 300.0),
         (7, 1, "fusion_1", 1200, 100.0), (7, 1, "empty", 1250, 0.0),
         (7, 2, "sm90_gemm", 0, 200.0), (1, 5, "PjitFunction", 0, 5000.0)]
  events = meta + [{"ph": "X", "pid": p, "tid": t, "name": n, "ts": ts, "dur": d}
                   for p, t, n, ts, d in ops]
  text = check.profile_tables(events)
  # The host's 5 ms are left out while a device process exists; threads busiest first.
  assert "PjitFunction" not in text and "empty" not in text
  first, second = text.split("\n\n/device:GPU:0 / Stream #14")
  # Busy is the union [0, 600] + [1000, 1300] = 900 µs of the span 0..1300 µs.
  assert first.startswith("/device:GPU:0 / Stream #13: busy 0.9 of 1.3 ms (69%); "
                          "1.0 ms of events in 2 op kinds")
  assert "| convolution | 0.90 | 90.0% |" in first and "| fusion | 0.10 | 10.0% |" in first
  assert "| sm90_gemm | 0.20 | 100.0% |" in second
  # Without device processes the host's threads stand in on a CPU run, and not on a GPU's.
  assert "| PjitFunction | 5.00 | 100.0% |" in check.profile_tables(meta[:1] + events[-1:])
  assert check.profile_tables(meta[:1] + events[-1:], host_fallback=False).startswith(
      "no device events")
