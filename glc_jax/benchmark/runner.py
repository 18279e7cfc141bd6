"""Runs the benchmark matrix in this process, resuming from what the workdir holds.

A cell whose evaluation wrote metrics.json is done and reused; an unfinished
pretraining or fine-tuning run resumes from its own checkpoints, so a killed
benchmark continues where it stopped. The stages run in-process with a
persistent XLA compilation cache in the workdir, so cells of the same shapes
(every seed, fraction and init of a fine-tuning model) compile once.
"""
from __future__ import annotations

import json
import pathlib
import time

import ml_collections

from glc_jax import compile_cache, parallel
from glc_jax.benchmark import matrix, report
from glc_jax.benchmark.matrix import Cell
from glc_jax.stages import evaluate, finetune, loop, pretrain, probe, run_dir, setup


def prepare_data(config: ml_collections.ConfigDict, work: pathlib.Path) -> str:
  """The dataset path: `data.path`, or a synthetic corpus converted under the workdir."""
  if config.data.path:
    return config.data.path
  from data_prep import convert, splits, synthetic  # pylint: disable=import-outside-toplevel
  s = config.synthetic
  corpus, dataset = work / "synthetic", work / "dataset"
  if not corpus.exists():
    synthetic.write_corpus(corpus, s.num_scenes, s.size, s.size, s.seed, s.bands, progress=True)
  subsets = sorted(set(splits.DEFAULT_SUBSET_FRACTIONS) | {float(f) for f in config.fractions})
  convert.convert(str(corpus / "images"), dataset, str(corpus / "labels"),
                  class_map=str(corpus / "class_dict.csv"), tile=s.tile,
                  split_fractions=splits.parse_fractions(s.split_fractions), split_seed=s.seed,
                  subset_fractions=subsets, progress=False)
  return str(dataset)


def labelled_counts(config: ml_collections.ConfigDict, data_path: str) -> dict[float, int]:
  """Tiles in each label subset; fails fast on a fraction the dataset does not store."""
  counts = {}
  for fraction in config.fractions:
    source, _ = setup.open_split(data_path, config.data.train_split, float(fraction),
                                 split_key="data.train_split", fraction_key="fractions")
    counts[float(fraction)] = len(source)
  for split, key in ((config.data.val_split, "data.val_split"),
                     (config.data.test_split, "data.test_split")):
    setup.open_split(data_path, split, split_key=key)
  return counts


def _check_batches(config: ml_collections.ConfigDict, work: pathlib.Path, data_path: str) -> None:
  """Each stage's batch size against the devices and the tiles it draws from, named by the
  benchmark's keys, before any cell runs: the fine-tuning stage would find a batch larger
  than a label subset only once that cell's pretraining has finished."""
  mesh = parallel.make_data_mesh()
  train_split = config.data.train_split
  if config.methods:
    source, info = setup.open_split(data_path, train_split, split_key="data.train_split")
    for method in config.methods:
      batch = matrix.pretrain_config(config, method, config.seeds[0], data_path).data.batch_size
      setup.checked_batch(batch, mesh, len(source), key="pretrain.data.batch_size", info=info)
  for fraction in config.fractions:
    source, info = setup.open_split(data_path, train_split, float(fraction),
                                    split_key="data.train_split", fraction_key="fractions")
    for init in matrix.inits(config):
      cell = Cell(init, float(fraction), config.seeds[0])
      batch = matrix.finetune_config(config, cell, work, data_path, len(source)).data.batch_size
      setup.checked_batch(batch, mesh, len(source), key="finetune.data.batch_size", info=info,
                          fraction_key="fractions")


def _check_norms(config: ml_collections.ConfigDict, work: pathlib.Path, data_path: str) -> None:
  """Fine-tuning refuses a checkpoint trained with another input normalisation: a pretrain.data.norm
  that differs from finetune.data.norm is found here, before the first pretraining, and so is one
  the dataset's pixel type does not allow."""
  if not config.methods:
    return
  _, info = setup.open_split(data_path, config.data.train_split, split_key="data.train_split")
  method, seed = config.methods[0], config.seeds[0]
  pretrained = matrix.pretrain_config(config, method, seed, data_path).data.norm
  setup.check_norm(pretrained, info, key="pretrain.data.norm")
  cell = Cell(method, float(config.fractions[0]), seed)
  finetuned = matrix.finetune_config(config, cell, work, data_path, num_labelled=1).data.norm
  if finetuned != pretrained:
    raise setup.ConfigError(
        f"pretrain.data.norm is {pretrained!r} but finetune.data.norm is {finetuned!r}; fine-tuning "
        "refuses a checkpoint trained with another normalisation: set both to the same")


def check_stages(config: ml_collections.ConfigDict, work: pathlib.Path, data_path: str) -> None:
  """What the stages would refuse only when their cell comes: named values and numeric ranges
  (setup.check_choices), batch sizes and normalisation."""
  seed = config.seeds[0]
  for method in config.methods:
    setup.check_choices(matrix.pretrain_config(config, method, seed, data_path), "pretrain.")
  for init in matrix.inits(config):
    cell = Cell(init, float(config.fractions[0]), seed)
    setup.check_choices(matrix.finetune_config(config, cell, work, data_path, num_labelled=1),
                      "finetune.")
    setup.check_choices(matrix.evaluate_config(config, cell, work, data_path), "evaluate.")
  _check_batches(config, work, data_path)
  _check_norms(config, work, data_path)


def _read_metrics(work: pathlib.Path, cell: Cell) -> dict:
  return json.loads((matrix.eval_dir(work, cell) / "metrics.json").read_text())


def run_cell(config, cell: Cell, work: pathlib.Path, data_path: str, num_labelled: int) -> dict:
  """Pretrains (if its run is unfinished), fine-tunes and evaluates one cell."""
  if cell.pretrained:
    pretrain.run(matrix.pretrain_config(config, cell.init, cell.seed, data_path),
                 str(matrix.pretrain_dir(work, cell.init, cell.seed)))
  finetune.run(matrix.finetune_config(config, cell, work, data_path, num_labelled),
               str(matrix.finetune_dir(work, cell)))
  return evaluate.run(matrix.evaluate_config(config, cell, work, data_path),
                      str(matrix.eval_dir(work, cell)))


def probe_histories(config, work: pathlib.Path) -> dict[tuple[str, int], list[dict]]:
  """(method, seed) → the online probe's history of each finished pretraining run that probed."""
  histories = {(m, s): probe.read_history(matrix.pretrain_dir(work, m, s))
               for m in config.methods for s in config.seeds}
  return {key: history for key, history in histories.items() if history}


def variant_label(config: ml_collections.ConfigDict) -> str:
  """The variant's name, with ', with overrides' when any key differs from the shipped variant."""
  try:
    shipped = matrix.load_config("benchmark", config.variant)
  except ValueError:  # --config.variant itself was overridden
    return f"{config.variant}, with overrides"
  return config.variant if shipped.to_json() == config.to_json() else f"{config.variant}, with overrides"


def write_reports(config, work: pathlib.Path, plots: bool) -> list[dict]:
  """results.csv and results.md from every finished cell (and PNG plots if `plots`), with the
  online probe's end-of-pretraining mIoU as the mIoU table's first column, where each
  fine-tuning run's best step fell, and, with the plots, probe_miou.png (probe mIoU against
  pretraining step)."""
  rows = [report.cell_row(c.init, c.fraction, c.seed, _read_metrics(work, c),
                          finetune.read_best_step(matrix.finetune_dir(work, c)))
          for c in matrix.cells(config) if matrix.is_done(work, c)]
  if not rows:
    return rows
  report.write_csv(work / "results.csv", rows)
  inits, fractions = matrix.inits(config), [float(f) for f in config.fractions]
  title = f"Benchmark ({variant_label(config)}): {', '.join(inits)}"
  histories = probe_histories(config, work)
  report.write_markdown(work / "results.md", report.results_markdown(
      rows, inits, fractions, title, config.data.test_split, report.probe_scores(histories)))
  if plots:
    report.plot_metrics(rows, inits, fractions, work)
    report.plot_probe(histories, work / "probe_miou.png")
  return rows


def interrupted_message(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The one line a Ctrl-C prints: what the stopped benchmark keeps and how to go on."""
  work = pathlib.Path(workdir)
  cells = matrix.cells(config)
  done = sum(matrix.is_done(work, cell) for cell in cells)
  return (f"benchmark: interrupted; {work} keeps the {done} of {len(cells)} cells that finished; "
          "run the same command again to go on: finished cells are reused and the interrupted "
          "one resumes from its newest checkpoint")


def run(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Runs every unfinished cell; returns the names of cells that failed (non-finite loss)."""
  work = pathlib.Path(workdir)
  matrix.check(config)
  run_dir.check_not_in_dataset(work.absolute())
  matrix.check_same_setup(config, work)
  if config.compilation_cache:
    compile_cache.enable(work / "jax_cache")
  data_path = prepare_data(config, work)
  counts = labelled_counts(config, data_path)
  check_stages(config, work, data_path)
  cells = matrix.cells(config)
  failed = []
  for k, cell in enumerate(cells, 1):
    if matrix.is_done(work, cell):
      print(f"[{k}/{len(cells)}] {cell.name}: done, reused")
      continue
    print(f"[{k}/{len(cells)}] {cell.name}: {counts[cell.fraction]} labelled tiles")
    start = time.perf_counter()
    try:
      result = run_cell(config, cell, work, data_path, counts[cell.fraction])
    except loop.NonFiniteLossError as e:
      print(f"[{k}/{len(cells)}] {cell.name}: FAILED: {e}")
      failed.append(cell.name)
      continue
    print(f"[{k}/{len(cells)}] {cell.name}: OA {100 * result['overall_accuracy']:.2f}, "
          f"mIoU {100 * result['miou']:.2f} ({time.perf_counter() - start:.0f} s)")
    matrix.record_setup(config, work)
    write_reports(config, work, plots=False)
  if write_reports(config, work, plots=True):
    plots = ", ".join(p.name for p in sorted(work.glob("*.png")))
    print(f"results: {work / 'results.md'} (tables, paired differences, per-class IoU), "
          f"{work / 'results.csv'} (one row per cell); plots in {work}: {plots}")
  return failed
