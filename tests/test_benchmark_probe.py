"""The online probe in the benchmark: the mIoU table's first column against hand-computed
figures, the probe-vs-step plot, and the pretraining configs the matrix builds."""
import json
import math
import pathlib

from glc_jax.benchmark import matrix, report, runner
from glc_jax.stages import probe


def _history(*points):
  return [{"step": s, "probe_oa": 0.5, "probe_kappa": 0.1, "probe_miou": m} for s, m in points]


HISTORIES = {
    ("glcnet", 0): _history((0, 0.10), (15, 0.30), (30, 0.40)),
    ("glcnet", 1): _history((0, 0.12), (15, 0.35), (30, 0.50)),
    ("simclr", 0): _history((0, 0.10), (15, 0.20), (30, 0.25)),
}


def test_probe_scores_end_of_pretraining_and_step_zero_control():
  scores = report.probe_scores(HISTORIES)
  assert scores["glcnet"][0] == 0.45 and math.isclose(scores["glcnet"][1], math.sqrt(0.005))
  assert scores["glcnet"][2] == 2
  assert scores["simclr"][0] == 0.25 and math.isnan(scores["simclr"][1])
  # The never-trained control pools every run's step 0: 0.10, 0.12, 0.10.
  assert math.isclose(scores["random"][0], 0.32 / 3) and scores["random"][2] == 3


def test_probe_is_the_miou_tables_first_column():
  rows = [report.cell_row(i, 0.05, s, {"overall_accuracy": 0.8, "kappa": 0.6, "miou": m,
                                       "mean_f1": 0.0, "num_pixels": 1})
          for i, s, m in (("glcnet", 0, 0.6), ("glcnet", 1, 0.7), ("random", 0, 0.5))]
  text = report.results_markdown(rows, ["glcnet", "simclr", "random"], [0.05], "t", "test",
                                 report.probe_scores(HISTORIES))
  miou = text[text.index("## mIoU"):text.index("## Per-class")]
  assert "| init | probe (end of pretraining) | 5% |" in miou
  assert f"| glcnet | 45.00 ± {100 * math.sqrt(0.005):.2f} | **65.00 ± 7.07** |" in miou
  assert "| simclr | 25.00 ± – |  |" in miou
  assert "| random | 10.67 ± 1.15 | 50.00 ± – |" in miou
  overall = text[text.index("## OA"):text.index("## Kappa")]
  assert "probe" not in overall
  assert "probe" not in report.results_markdown(rows, ["glcnet"], [0.05], "t", "test")


def test_probe_plot(tmp_path):
  path = report.plot_probe(HISTORIES, tmp_path / "probe_miou.png")
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert report.plot_probe({}, tmp_path / "none.png") is None
  assert not (tmp_path / "none.png").exists()


def test_pretraining_runs_probe_on_the_benchmark_splits():
  config = matrix.load_config("benchmark", "small")
  config.data.train_split, config.data.val_split = "tr", "va"
  pre = matrix.pretrain_config(config, "glcnet", 0, "/data")
  assert pre.probe.enabled and pre.probe.split == "tr" and pre.probe.eval_split == "va"
  assert matrix.pretrain_config(matrix.load_config("benchmark", None), "simclr", 0,
                                "/data").probe.enabled


def test_reports_read_each_runs_probe_history(tmp_path):
  config = matrix.load_config("benchmark", "small")
  for cell in matrix.cells(config):
    out = matrix.eval_dir(tmp_path, cell)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(
        {"overall_accuracy": 0.8, "kappa": 0.6, "miou": 0.5, "mean_f1": 0.0, "num_pixels": 1}))
  for (method, seed), history in HISTORIES.items():
    work = matrix.pretrain_dir(tmp_path, method, seed)
    work.mkdir(parents=True)
    probe.write_history(work, history)
  runner.write_reports(config, tmp_path, plots=True)
  assert "| glcnet | 45.00 ± 7.07 | **50.00 ± 0.00** | **50.00 ± 0.00** |" in (tmp_path / "results.md").read_text()
  assert (tmp_path / "probe_miou.png").stat().st_size > 0
  assert runner.probe_histories(config, pathlib.Path(tmp_path / "elsewhere")) == {}
