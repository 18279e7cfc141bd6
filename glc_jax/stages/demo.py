"""The demo chain on the synthetic corpus (the README's main job).

Every step writes under the workdir and is skipped or resumed when its output
is already there, so rerunning the command continues where it stopped. The
demo holds its workdir (run.lock) while it runs; a second demo there is refused.
Each step's wall time is printed when it ends, and all of them with the total
at the end (a step found done on a rerun counts only the time to find it so).
The demo's `seed` seeds everything: the corpus, the split, pretraining and both
fine-tunings (it replaces the stages' own seed keys).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import pathlib
import time

import ml_collections

from data_prep import convert, splits, synthetic
from glc_jax import predictions, preview
from glc_jax.stages import evaluate, finetune, pretrain, probe, run_dir, setup

STEPS = ("synthetic corpus", "ArrayRecord dataset", "GLCNet pretraining", "fine-tuning",
         "evaluation")
INITS = ("glcnet", "random")


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  # Each stage below holds its own sub-workdir (other lock files), so holding
  # this one for the whole chain cannot block them.
  with run_dir.claim(workdir):
    _chain(config, pathlib.Path(workdir))


class _Clock:
  """Wall seconds of each step (1..5), per init for the steps run once per init."""

  def __init__(self):
    self.seconds: dict[int, dict[str, float]] = {}
    self._start = time.perf_counter()

  @contextlib.contextmanager
  def step(self, number: int, init: str = ""):
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    self.seconds.setdefault(number, {})[init] = took
    print(f"[{number}/5] {STEPS[number - 1]}{f' ({init})' if init else ''} took {_duration(took)}")

  def table(self) -> str:
    rows = []
    for number, parts in sorted(self.seconds.items()):
      each = ", ".join(f"{init} {_duration(s)}" for init, s in parts.items() if init)
      rows.append(f"  [{number}/5] {STEPS[number - 1]:<20} {_duration(sum(parts.values())):>8}"
                  + (f"  ({each})" if each else ""))
    rows.append(f"  {'total':<26} {_duration(time.perf_counter() - self._start):>8}")
    return "\n".join(rows)


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(round(seconds), 60)
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _chain(config: ml_collections.ConfigDict, work: pathlib.Path) -> None:
  clock = _Clock()
  corpus, dataset = work / "synthetic", work / "dataset"
  print(f"[1/5] {STEPS[0]} → {corpus}")
  with clock.step(1):
    if not corpus.exists():
      s = config.synthetic
      synthetic.write_corpus(corpus, s.num_scenes, s.size, s.size, config.seed, s.bands, s.dtype,
                             progress=True)
  print(f"[2/5] {STEPS[1]} → {dataset}")
  with clock.step(2):
    convert.convert(str(corpus / "images"), dataset, str(corpus / "labels"),
                    class_map=str(corpus / "class_dict.csv"), tile=config.prep.tile,
                    split_fractions=splits.parse_fractions(config.prep.split_fractions),
                    split_seed=config.seed)

  print(f"[3/5] {STEPS[2]}")
  with clock.step(3):
    pre = config.pretrain.copy_and_resolve_references()
    pre.data.path = str(dataset)
    pre.seed = config.seed
    pretrain.run(pre, str(work / "pretrain_glcnet"))
  probe_history = probe.read_history(work / "pretrain_glcnet")
  if probe_history:
    print(probe.summary(probe_history, config.pretrain.probe.eval_split))

  results = {}
  for init in INITS:
    print(f"[4/5] {STEPS[3]} on {config.prep.label_fraction:.0%} of the labels, init: {init}")
    with clock.step(4, init):
      ft = config.finetune.copy_and_resolve_references()
      ft.data.path = str(dataset)
      ft.seed = config.seed
      ft.data.label_fraction = config.prep.label_fraction
      ft.init.kind = "checkpoint" if init == "glcnet" else "random"
      ft.init.path = str(work / "pretrain_glcnet") if init == "glcnet" else ""
      finetune.run(ft, str(work / f"finetune_{init}"))
    print(f"[5/5] {STEPS[4]} ({init}) on the test scenes")
    with clock.step(5, init):
      ev = config.evaluate.copy_and_resolve_references()
      ev.data.path = str(dataset)
      ev.checkpoint = str(work / f"finetune_{init}")
      results[init] = evaluate.run(ev, str(work / f"eval_{init}"))

  rows = [f"{'init':<8} {'OA':>7} {'Kappa':>7} {'mIoU':>7}"]
  for init, r in results.items():
    rows.append(f"{init:<8} {100 * r['overall_accuracy']:7.2f} {100 * (r['kappa'] or 0):7.2f} "
                f"{100 * r['miou']:7.2f}")
  table = "\n".join(rows)
  (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  print(f"\nTest scenes, fine-tuned on {config.prep.label_fraction:.0%} of the training labels:\n{table}")
  previews = _write_previews(work, str(dataset), config.evaluate.data.split)
  print(f"\nWall time per step:\n{clock.table()}")
  print(f"\n{_outputs(work, previews)}")


def _write_previews(work: pathlib.Path, dataset: str, split: str) -> dict[str, pathlib.Path]:
  """preview_<init>.png of the split's first scene for each init whose evaluation wrote
  predictions (evaluate.write_predictions); their paths."""
  source, info = setup.open_split(dataset, split)
  scene_ids = list(dict.fromkeys(str(source[i]["scene_id"]) for i in range(len(source))))
  scene_id = scene_ids[0]
  stem = predictions.scene_file_stems(scene_ids)[scene_id]
  found = {init: work / f"eval_{init}" / "predictions" / f"{stem}_class.tif" for init in INITS}
  found = {init: path for init, path in found.items() if path.exists()}
  if not found:
    return {}
  image, label = preview.assemble_scene(source, scene_id, info.num_bands)
  paths = {}
  for init, prediction in found.items():
    paths[init] = work / f"preview_{init}.png"
    predicted = preview.read_prediction(prediction)
    preview.write_scene_preview(paths[init], image, label, predicted, info.class_colours,
                                info.class_names, f"{split} scene {scene_id}, fine-tuned from {init} "
                                "init")
  return paths


def _outputs(work: pathlib.Path, previews: dict[str, pathlib.Path]) -> str:
  """What the demo made, where, and how to look at it."""
  evals = [work / f"eval_{init}" for init in INITS]
  tifs = [p for e in evals for p in sorted((e / "predictions").glob("*.tif"))]
  logs = " ".join(str(work / d / "tb") for d in ["pretrain_glcnet"] + [f"finetune_{i}" for i in INITS])
  tensorboard = (f"tensorboard --logdir {work}" if importlib.util.find_spec("tensorboard") else
                 f"pip install tensorboard && tensorboard --logdir {work}   (glc-jax does not "
                 "install TensorBoard; it only writes the logs)")
  off = ["    none: evaluate.write_predictions is off"]
  lines = ["What the demo made:",
           f"  the table above         {work / 'results.json'}",
           "  metrics (OA, Kappa, mIoU, per-class IoU/F1):",
           *(f"    {e / 'metrics.json'}" for e in evals),
           "  confusion matrices (rows: true class, normalised), PNG:",
           *(f"    {e / 'confusion_matrix.png'}" for e in evals),
           "  previews (a test scene | its true labels | the prediction), PNG:",
           *([f"    {p}" for p in previews.values()] or off),
           "  predictions, georeferenced GeoTIFFs (class indices with a colour table, and RGB "
           "colours; open them in QGIS or with rasterio):",
           *([f"    {p}" for p in tifs] or off),
           f"  training curves (TensorBoard logs in {logs}):",
           f"    {tensorboard}"]
  return "\n".join(lines)
