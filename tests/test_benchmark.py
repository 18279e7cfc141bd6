"""The benchmark runner: aggregation against hand-computed figures, config checks, and
resuming a killed matrix without redoing finished cells."""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from glc_jax.benchmark import matrix, report



def _row(init, fraction, seed, oa, kappa, miou, iou_car=0.5):
  return report.cell_row(init, fraction, seed, {
      "overall_accuracy": oa, "kappa": kappa, "miou": miou, "mean_f1": 0.0, "num_pixels": 10,
      "per_class": {"building": {"iou": miou}, "car": {"iou": iou_car}}})


def test_mean_and_sample_std_in_percent_with_best_in_bold():
  rows = [_row("glcnet", 0.05, 0, 0.50, 0.10, 0.30), _row("glcnet", 0.05, 1, 0.60, 0.20, 0.40),
          _row("glcnet", 0.05, 2, 0.70, 0.30, 0.50),
          _row("random", 0.05, 0, 0.55, 0.40, 0.20), _row("random", 0.05, 1, 0.65, 0.50, 0.20),
          _row("random", 0.25, 0, 0.80, None, 0.60)]
  # OA glcnet: mean 60, sample std sqrt(((−10)² + 0 + 10²)/2) = 10; random: 60 ± sqrt(50).
  oa = report.metric_table(rows, "overall_accuracy", ["glcnet", "random"], [0.05, 0.25])
  assert "| glcnet | **60.00 ± 10.00** |  |" in oa
  assert f"| random | **60.00 ± {math.sqrt(50):.2f}** | **80.00 ± –** |" in oa
  kappa = report.metric_table(rows, "kappa", ["glcnet", "random"], [0.05, 0.25])
  assert "| glcnet | 20.00 ± 10.00 |  |" in kappa
  assert f"| random | **45.00 ± {math.sqrt(50):.2f}** | – |" in kappa  # a None kappa is not a score
  per_class = report.per_class_table(rows, ["glcnet", "random"], [0.05, 0.25])
  assert "| glcnet | 5% | 40.00 | 50.00 |" in per_class
  assert "| random | 25% | 60.00 | 50.00 |" in per_class


def test_csv_round_trip_keeps_every_cell(tmp_path):
  rows = [_row("glcnet", 0.05, 0, 0.5, 0.1, 0.3), _row("simclr", 1.0, 2, 0.25, None, 0.125)]
  report.write_csv(tmp_path / "r.csv", rows)
  back = report.read_csv(tmp_path / "r.csv")
  assert [(r["init"], r["fraction"], r["seed"]) for r in back] == [("glcnet", 0.05, 0), ("simclr", 1.0, 2)]
  assert back[1]["miou"] == 0.125 and math.isnan(back[1]["kappa"])
  assert back[0]["iou_car"] == 0.5 and back[1]["iou_building"] == 0.125


def test_one_fraction_plots_the_inits_side_by_side_mid_axis(tmp_path, monkeypatch):
  """Each init's point sits near the middle of the x axis (in axes coordinates), a few
  pixels from the other's, as with several fractions."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  figures, close = [], plt.close
  monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), close(fig)))
  rows = [_row(init, 0.25, seed, 0.5 + 0.1 * seed, 0.2, 0.3) for init in ("glcnet", "random")
          for seed in (0, 1)]
  report.plot_metrics(rows, ["glcnet", "random"], [0.25], tmp_path)
  assert len(figures) == len(report.METRICS)
  for fig in figures:
    ax = fig.axes[0]
    to_axes = ax.transData + ax.transAxes.inverted()
    xs = [to_axes.transform((line.get_xdata()[0], line.get_ydata()[0]))[0] for line in ax.lines
          if len(line.get_xdata()) == 1 and line.get_marker() not in ("_", "|", "None", None)]
    assert len(xs) == 2 and all(0.4 < x < 0.6 for x in xs), xs
    width_px = fig.get_size_inches()[0] * fig.dpi * ax.get_position().width
    assert 2 < abs(xs[0] - xs[1]) * width_px < 40, xs


def _small_config():
  return matrix.load_config("benchmark", "small")


def test_stage_configs_carry_the_cell():
  config = _small_config()
  work = pathlib.Path("/w")
  cell = matrix.Cell("glcnet", 0.05, 1)
  ft = matrix.finetune_config(config, cell, work, "/data", num_labelled=24)
  assert ft.init.kind == "checkpoint" and ft.init.path == "/w/pretrain/glcnet/seed1"
  assert ft.seed == 1 and ft.data.label_fraction == 0.05 and ft.data.path == "/data"
  assert ft.epochs == math.ceil(config.finetune_steps / (24 // ft.data.batch_size))
  assert matrix.finetune_config(config, matrix.Cell("random", 0.25, 0), work, "/data", 120).init.kind == "random"
  pre = matrix.pretrain_config(config, "simclr", 1, "/data")
  assert pre.method == "simclr" and pre.seed == 1 and pre.model.width == 0.25
  ev = matrix.evaluate_config(config, cell, work, "/data")
  assert ev.checkpoint == "/w/finetune/glcnet/f0.05/seed1" and ev.data.split == "test"


def test_the_report_title_says_when_the_variant_was_overridden():
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  config = matrix.load_config("benchmark", "smoke")
  assert runner.variant_label(config) == "smoke"
  config.finetune_steps = 20
  assert runner.variant_label(config) == "smoke, with overrides"
  assert runner.variant_label(matrix.load_config("benchmark", None)) == "full"


def test_bad_keys_fail_in_one_line(tmp_path):
  config = _small_config()
  config.methods = ("glcnet", "byol")
  with pytest.raises(matrix.BenchmarkConfigError, match="methods: unknown.*byol"):
    matrix.check(config)
  config = _small_config()
  config.finetune.epochz = 3
  with pytest.raises(matrix.BenchmarkConfigError, match="finetune.epochz"):
    matrix.finetune_config(config, matrix.Cell("random", 0.05, 0), tmp_path, "/d", 24)
  config = _small_config()
  matrix.record_setup(config, tmp_path)
  config.seeds = (0, 1, 2)  # growing the matrix is allowed
  matrix.check_same_setup(config, tmp_path)
  config.evaluate.eval.batch_size = 4  # how cells run, not what they score
  config.finetune.log_every = 3
  matrix.check_same_setup(config, tmp_path)
  config.finetune_steps, config.pretrain.data.norm = 7, "stats"
  with pytest.raises(matrix.BenchmarkConfigError, match=(
      r"this workdir was run with other settings: finetune_steps \d+ → 7, pretrain.data.norm "
      r"'<absent>' → 'stats'; finished cells would not be comparable. Use a new --workdir$")):
    matrix.check_same_setup(config, tmp_path)
  config = _small_config()
  config.finetune_steps = -1
  with pytest.raises(matrix.BenchmarkConfigError, match="^config key finetune_steps is -1; "):
    matrix.check(config)


def test_a_workdir_set_up_before_the_step_keys_existed_reruns(tmp_path):
  config = _small_config()
  matrix.record_setup(config, tmp_path)
  path = tmp_path / "benchmark_config.json"
  record = json.loads(path.read_text())
  del record["finetune_validate_steps"], record["finetune_patience_steps"]
  path.write_text(json.dumps(record))
  matrix.check_same_setup(config, tmp_path)
  config.finetune_validate_steps = 15
  with pytest.raises(matrix.BenchmarkConfigError, match="finetune_validate_steps"):
    matrix.check_same_setup(config, tmp_path)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """Four scenes of four tiles: 8 train tiles (2 in the 25% subset), 4 val, 4 test."""
  from data_prep import convert, synthetic  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("bench_data")
  synthetic.write_corpus(root / "corpus", num_scenes=4, height=128, width=128, seed=0, bands=4)
  return str(convert.convert(str(root / "corpus" / "images"), root / "ds",
                             str(root / "corpus" / "labels"),
                             class_map=str(root / "corpus" / "class_dict.csv"), tile=64,
                             split_fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                             workers=0, progress=False))


def test_a_failed_attempt_leaves_the_workdir_open_to_a_corrected_one(dataset, tmp_path, monkeypatch):
  """The walkthrough's sequence: a batch too large for the training split, then one too large for
  the label subset, each found before any stage runs and named by the benchmark's key; neither
  attempt records a setup, so the corrected command goes on to pretrain."""
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel

  class Pretrained(Exception):
    pass

  def pretrain(config, workdir):
    raise Pretrained(config.data.batch_size)

  monkeypatch.setattr(runner.pretrain, "run", pretrain)
  config = _small_config()
  config.methods, config.fractions, config.seeds = ("glcnet",), (0.25,), (0,)
  config.data.path, config.compilation_cache = dataset, False
  work = tmp_path / "bench"
  with pytest.raises(setup.ConfigError, match=r"^pretrain\.data\.batch_size 32 is larger than the 8 "
                     r"records of split 'train'$"):
    runner.run(config, str(work))
  config.pretrain.data.batch_size = 8
  with pytest.raises(setup.ConfigError, match=(
      r"^finetune\.data\.batch_size 8 is larger than the 2 records that fractions 0\.25 keeps of "
      r"split 'train' \(8 records\); raise fractions or lower finetune\.data\.batch_size$")):
    runner.run(config, str(work))
  config.fractions = (1.0,)
  with pytest.raises(Pretrained):
    runner.run(config, str(work))
  assert not (work / "benchmark_config.json").exists()


@pytest.mark.parametrize("stage, key, value, message", [
    # Fine-tuning refuses a checkpoint trained with another normalisation.
    ("pretrain", "data.norm", "stats",
     r"^pretrain.data.norm is 'stats' but finetune.data.norm is 'reference'; fine-tuning refuses "
     r"a checkpoint trained with another normalisation: set both to the same$"),
    # The benchmark calls the stages without train.py, whose up-front checks it must run too.
    ("finetune", "optimizer", {"lr": -5e-4},
     r"^config key finetune.optimizer.lr is -0.0005; expected a number > 0 "),
])
def test_a_stage_config_a_later_cell_would_refuse_is_found_before_any_cell(
    dataset, tmp_path, monkeypatch, stage, key, value, message):
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel

  def pretrain(config, workdir):
    raise AssertionError("checked before the first pretraining")

  monkeypatch.setattr(runner.pretrain, "run", pretrain)
  config = _small_config()
  config.methods, config.fractions, config.seeds = ("glcnet",), (1.0,), (0,)
  config.data.path, config.compilation_cache = dataset, False
  config.pretrain.data.batch_size = 8
  section, _, name = key.rpartition(".")
  (config[stage][section] if section else config[stage])[name] = value
  with pytest.raises(setup.ConfigError, match=message):
    runner.run(config, str(tmp_path / "bench"))
  assert not (tmp_path / "bench" / "benchmark_config.json").exists()


# The matrix runs in a subprocess with the stages replaced by fakes that take
# ~0.3 s and write what the real ones write (metrics.json last, atomically), so
# the test exercises the runner's own bookkeeping: which cells it skips, runs
# and resumes, through the command's main. The stages' own resume is tested with the stages.
_DRIVER = textwrap.dedent("""
    import json, os, pathlib, sys, time
    from glc_jax.benchmark import matrix, runner
    log = open(sys.argv[2], "a")

    def fake(stage):
      def run(config, workdir):
        log.write(f"{stage} {workdir}\\n"); log.flush()
        time.sleep(0.3)
        work = pathlib.Path(workdir); work.mkdir(parents=True, exist_ok=True)
        if stage == "evaluate":
          ft = json.loads((pathlib.Path(config.checkpoint) / "config.json").read_text())
          oa = 0.5 + 0.1 * ft["seed"] + ft["data"]["label_fraction"]
          result = dict(overall_accuracy=oa, kappa=oa / 2, miou=oa / 4, mean_f1=0.0, num_pixels=1,
                        per_class={"car": {"iou": oa / 4}})
          (work / ".m.tmp").write_text(json.dumps(result)); os.replace(work / ".m.tmp", work / "metrics.json")
          return result
        (work / "config.json").write_text(json.dumps(config.to_dict()))
      return run

    for stage in ("pretrain", "finetune", "evaluate"):
      getattr(runner, stage).run = fake(stage)
    runner.prepare_data = lambda config, work: "/nonexistent/dataset"
    runner.labelled_counts = lambda config, path: {float(f): 24 for f in config.fractions}
    runner.check_stages = lambda config, work, path: None
    from absl import app
    from glc_jax import cli
    from glc_jax.benchmark import __main__ as command
    # config_flags reads its --config.KEY overrides from sys.argv itself.
    sys.argv = ["benchmark", f"--config={matrix.CONFIG_DIR / 'benchmark.py'}:small",
                f"--workdir={sys.argv[1]}", "--config.methods=('glcnet',)",
                "--config.compilation_cache=False"]
    app.run(command.main, flags_parser=cli.parse_flags)
""")


_ALL_CELLS = [matrix.Cell(i, f, s) for s in (0, 1) for i in ("glcnet", "random") for f in (0.05, 0.25)]


def _start_after_first_cell(tmp_path):
  """The driver, started and left running once its first cell has finished; its stderr is piped."""
  driver = tmp_path / "driver.py"
  driver.write_text(_DRIVER)
  work, log = tmp_path / "bench", tmp_path / "calls.log"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # A shell starts background jobs with SIGINT ignored and children inherit that; a terminal's
  # Ctrl-C reaches a foreground command, which has the default.
  proc = subprocess.Popen([sys.executable, str(driver), str(work), str(log)], env=env, text=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  first_metrics = matrix.eval_dir(work, _ALL_CELLS[0]) / "metrics.json"
  deadline = time.time() + 60
  while not first_metrics.exists():
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    assert time.time() < deadline, "the first cell never finished"
    time.sleep(0.05)
  return proc, driver, work, log, env


def test_ctrl_c_is_one_line_saying_what_is_kept(tmp_path):
  proc, _, work, _, _ = _start_after_first_cell(tmp_path)
  time.sleep(0.5)  # into the next cell's stages
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=60)
  done = len(list((work / "eval").glob("*/*/*/metrics.json")))
  assert proc.returncode == 130, stderr[-2000:]
  assert stderr.splitlines() == [
      f"benchmark: interrupted; {work} keeps the {done} of 8 cells that finished; run the same "
      "command again to go on: finished cells are reused and the interrupted one resumes from its "
      "newest checkpoint"], stderr[-2000:]


@pytest.mark.slow
def test_killed_matrix_resumes_without_redoing_finished_cells(tmp_path):
  proc, driver, work, log, env = _start_after_first_cell(tmp_path)
  first = _ALL_CELLS[0]
  first_metrics = matrix.eval_dir(work, first) / "metrics.json"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  mtime = first_metrics.stat().st_mtime_ns
  assert sum(matrix.is_done(work, c) for c in _ALL_CELLS) < len(_ALL_CELLS)
  calls_before = log.read_text().splitlines()

  done = subprocess.run([sys.executable, str(driver), str(work), str(log)], env=env,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  rerun_calls = log.read_text().splitlines()[len(calls_before):]
  assert first_metrics.stat().st_mtime_ns == mtime
  assert not any(str(matrix.finetune_dir(work, first)) in c or str(matrix.eval_dir(work, first)) in c
                 for c in rerun_calls)
  assert all(matrix.is_done(work, c) for c in _ALL_CELLS)
  # Every cell was evaluated exactly once over both runs.
  evaluations = [c for c in calls_before + rerun_calls if c.startswith("evaluate ")]
  assert sorted(evaluations) == sorted(f"evaluate {matrix.eval_dir(work, c)}" for c in _ALL_CELLS)

  rows = report.read_csv(work / "results.csv")
  assert len(rows) == len(_ALL_CELLS)
  expected = {(c.init, c.fraction, c.seed): 0.5 + 0.1 * c.seed + c.fraction for c in _ALL_CELLS}
  assert all(math.isclose(r["overall_accuracy"], expected[(r["init"], r["fraction"], r["seed"])])
             for r in rows)
  # glcnet at 5%: seeds 0 and 1 give 55% and 65% → 60.00 ± 7.07 (tied with random: bold).
  assert f"| glcnet | **60.00 ± {math.sqrt(50):.2f}** |" in (work / "results.md").read_text()
  assert all((work / f"{k}.png").stat().st_size > 0 for k in ("overall_accuracy", "kappa", "miou"))
  # The run ends naming what it wrote.
  assert done.stdout.splitlines()[-1] == (
      f"results: {work / 'results.md'} (tables, paired differences, per-class IoU), "
      f"{work / 'results.csv'} (one row per cell); plots in {work}: kappa.png, miou.png, "
      "overall_accuracy.png")


def test_dataset_errors_name_the_benchmark_keys(tmp_path):
  from data_prep import convert, synthetic  # pylint: disable=import-outside-toplevel
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel
  synthetic.write_corpus(tmp_path / "corpus", num_scenes=3, height=64, width=64, seed=0, bands=4)
  data = str(convert.convert(str(tmp_path / "corpus" / "images"), tmp_path / "ds",
                             str(tmp_path / "corpus" / "labels"),
                             class_map=str(tmp_path / "corpus" / "class_dict.csv"), tile=32,
                             split_fractions={"train": 0.34, "val": 0.33, "test": 0.33},
                             workers=0, progress=False))
  config = _small_config()
  config.fractions = (0.3,)  # not a stored subset
  with pytest.raises(setup.ConfigError, match=r"^fractions: "):
    runner.labelled_counts(config, data)
  config = _small_config()
  config.data.test_split = "tset"
  with pytest.raises(setup.ConfigError, match=r"^data\.test_split: "):
    runner.labelled_counts(config, data)


def test_medium_variant_builds_every_stage_config_with_its_budgets():
  """The medium matrix as the issue asks: every method and ablation plus random init, two
  fractions, >= 5 seeds; each pretraining config builds, and fine-tuning validates every
  15 steps with a 10-validation window at both fractions (24 and 120 labelled tiles at
  batch 8: epochs of 3 and 15 steps)."""
  config = matrix.load_config("benchmark", "medium")
  matrix.check(config)
  assert sorted(config.methods) == sorted([
      "glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr", "mocov2",
      "inpainting", "jigsaw"])
  assert len(config.seeds) >= 5 and len(config.fractions) == 2 and config.random_init
  assert len(matrix.cells(config)) == (len(config.methods) + 1) * 2 * len(config.seeds)
  for method in config.methods:
    c = matrix.pretrain_config(config, method, 3, "/data")
    assert (c.method, c.seed, c.model.depth, c.probe.enabled) == (method, 3, 18, False)
  for num_labelled, steps_per_epoch in ((24, 3), (120, 15)):
    c = matrix.finetune_config(config, matrix.Cell("glcnet", 0.05, 0), pathlib.Path("/w"), "/data",
                               num_labelled)
    assert c.validate_every_epochs * steps_per_epoch == 15 and c.early_stopping.patience == 10
    assert c.epochs * steps_per_epoch == 600 and c.optimizer.lr == 5e-4
