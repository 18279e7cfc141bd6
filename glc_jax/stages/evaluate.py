"""Evaluation of a fine-tuned model over whole scenes of a split.

Tiles are put back into their scenes (by scene_id and window), each scene is
predicted with overlapping sliding windows whose logits are averaged, and every
pixel of the split enters one confusion matrix. Writes to the workdir:
config.json, metrics.json, confusion_matrix.png and, per scene,
predictions/<scene>_class.tif (class indices; 255, nodata, where the label is
ignored: image nodata, outside every tile, an ignored class) and
predictions/<scene>_colour.tif (black there), both carrying the scene's CRS and
geotransform. Scene ids become file names through predictions.scene_file_stems
(an id that is no safe file name gets a readable, unique replacement), and no
prediction is written outside predictions/.

A split without labels (data_prep without --labels) is predicted only, for mapping new
scenes: the same GeoTIFFs (255/black outside every tile and where every band equals the
image nodata data_prep was given with --nodata, the one nodata an unlabelled record keeps),
and predictions.json instead of metrics.json and the confusion matrix: split, checkpoint,
num_scenes, class_names, nodata and, per scene, its scene_id and the workdir-relative paths
of its class and colour GeoTIFFs. Not a metrics.json without scores, so that a script
reading scores finds none rather than a file that looks like an evaluation. The classes are
the dataset's own (data_prep --class-map), else those in the metadata.json of the dataset
the checkpoint was fine-tuned on (data.path of its run's config.json); metrics_mode is moot
and write_predictions False is refused (nothing would be done).

The predictions are written to a hidden folder that replaces predictions/ whole
at the end, just before metrics.json (or predictions.json) is written: an interrupted run leaves the
previous outputs as they were, or none if it had begun replacing them (only
config.json then).
A workdir holds one evaluation: a rerun with another config (other than
RERUN_KEYS) or into another stage's workdir is refused; the same config
evaluates again and replaces the outputs.

Config keys (configs/evaluate.py): data.path, data.split; data.norm, empty to
take the checkpoint run's (its config.json; 'reference' without one), and
refused when it differs from it; 'stats' normalises with the band statistics
of the checkpoint run's dataset, which for scenes converted on their own are
not theirs; checkpoint (a fine-tuning workdir: its best state; or one step
directory in it, whose run config is the workdir's); model (depth,
output_stride, width, dtype), taken from the checkpoint
run's config.json when model_from_checkpoint is True; eval.crop, eval.stride,
eval.batch_size; write_predictions; metrics_mode: 'ours' (one global confusion
matrix) or 'reference' (also the reference's mIoU: per-class IoU on each tile
of the split, a class absent from a tile scoring 0, averaged over tiles then
classes; metrics.json key "reference", printed under ours and named as such).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from glc_jax import checkpoint, files, inference, metrics, parallel, predictions
from glc_jax.data import pipelines, recipes
from glc_jax.stages import finetune, run_dir, setup


def _model_config(config: ml_collections.ConfigDict, run_config: dict) -> ml_collections.ConfigDict:
  saved = run_config.get("model")
  if config.model_from_checkpoint and saved:
    return ml_collections.ConfigDict({"model": saved})
  return ml_collections.ConfigDict({"model": config.model.to_dict()})


def _norm_mode(config: ml_collections.ConfigDict, run_config: dict) -> str:
  """The input normalisation the checkpoint was trained with: evaluating with another one
  silently scores a model on inputs it never saw."""
  trained = (run_config.get("data") or {}).get("norm")
  if config.data.norm and trained and config.data.norm != trained:
    raise setup.ConfigError(f"data.norm is {config.data.norm!r}, but {config.checkpoint} was "
                            f"trained with {trained!r}; leave data.norm unset to use the checkpoint's")
  return config.data.norm or trained or "reference"


def _training_dataset(config: ml_collections.ConfigDict, run_config: dict, needed: str):
  """DatasetInfo of the dataset the checkpoint was trained on (data.path and data.split of its
  run's config.json), or None where the run config names none; `needed` says what is taken
  from it, for the one-line errors."""
  data = run_config.get("data") or {}
  trained_on = data.get("path")
  if not trained_on:
    return None
  prefix = f"checkpoint: {config.checkpoint} was trained with {needed} {trained_on}"
  if not pathlib.Path(trained_on).is_absolute() and not pathlib.Path(trained_on).exists():
    raise setup.ConfigError(f"{prefix}, a path relative to the folder the training ran in and not "
                            "found from this one; run from that folder")
  try:
    _, info = setup.open_split(trained_on, data.get("split") or "train")
  except setup.ConfigError as e:
    raise setup.ConfigError(f"{prefix}, which does not open ({e})") from None
  return info


def _normalisation(norm_mode: str, info, config: ml_collections.ConfigDict, run_config: dict) -> dict:
  """The recipe's norm config: for 'stats', the band statistics the checkpoint was trained
  with, those of its run's dataset when that is another dataset than the one evaluated, e.g.
  new scenes converted on their own, whose statistics the model never saw."""
  trained_on = (run_config.get("data") or {}).get("path")
  if (norm_mode != "stats" or not trained_on
      or pathlib.Path(trained_on).resolve() == pathlib.Path(config.data.path).resolve()):
    return pipelines.dataset_data_config(info, norm_mode=norm_mode)["norm"]
  trained = _training_dataset(config, run_config, "data.norm 'stats' on the band statistics of")
  if trained.num_bands != info.num_bands:
    raise setup.ConfigError(f"checkpoint: {config.checkpoint} was trained on {trained.num_bands} "
                            f"bands ({trained_on}), data.path has {info.num_bands}")
  return pipelines.dataset_data_config(trained, norm_mode="stats")["norm"]


def _pretraining_checkpoint(run_config: dict, variables, expected) -> str | None:
  """Why `variables` look like a pretraining checkpoint (its config.json, or pretext heads), or None."""
  if run_config.get("stage") == "pretrain":
    return "its run's config.json says stage 'pretrain'"
  extra = sorted(set(variables["params"]) - set(expected["params"]))
  if extra and "backbone" in variables["params"]:
    return f"it has pretext layers a fine-tuned model lacks: {', '.join(extra)}"
  return None


def _check_compatible(variables, model, num_bands: int, where: str, checkpoint_path: str,
                      run_config: dict):
  """One-line error if the checkpoint does not fit the model and dataset."""
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 64, 64, num_bands), np.float32))
  why = _pretraining_checkpoint(run_config, variables, expected)
  if why:
    raise setup.ConfigError(f"{where}: {checkpoint_path} is a pretraining checkpoint ({why}); "
                            "fine-tune it first (configs/finetune.py with init.path set to it) "
                            "and evaluate the fine-tuning workdir")
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  flat_found = dict(jax.tree_util.tree_leaves_with_path(
      {"params": variables["params"], "batch_stats": variables["batch_stats"]}))
  for path, leaf in flat_expected.items():
    name = jax.tree_util.keystr(path)
    if path not in flat_found:
      raise setup.ConfigError(f"{where}: checkpoint lacks {name}; is it a fine-tuned DeepLabv3+ "
                              "of this model size?")
    if tuple(np.shape(flat_found[path])) != tuple(leaf.shape):
      what = ("class count" if "classifier" in name else
              "band count" if "conv1" in name and "backbone" in name else "model size")
      raise setup.ConfigError(f"{where}: {what} does not match: {name} is "
                              f"{tuple(np.shape(flat_found[path]))} in the checkpoint, "
                              f"{tuple(leaf.shape)} for this dataset and model")


def _with_checkpoint_classes(info, config: ml_collections.ConfigDict, run_config: dict):
  """`info` of an unlabelled split, with the classes the checkpoint predicts: the dataset's own
  (data_prep --class-map), else those of the dataset the checkpoint was fine-tuned on."""
  if info.class_names:
    return info
  hint = "convert the scenes with data_prep --class-map to name the classes"
  trained = _training_dataset(config, run_config, "the classes of")
  if trained is None:
    raise setup.ConfigError(f"data.path: split {info.split!r} has no labels and names no classes, "
                            f"and {config.checkpoint} has no run config naming its training dataset; "
                            f"{hint}")
  if not trained.class_names:
    raise setup.ConfigError(f"checkpoint: its training dataset {run_config['data']['path']} names "
                            f"no classes; {hint}")
  return dataclasses.replace(info, class_names=trained.class_names,
                             class_colours=trained.class_colours)


def _check_like_training(info, config: ml_collections.ConfigDict, run_config: dict) -> None:
  """Refuses a split whose pixel type or classes are not those of the dataset the checkpoint was
  trained on: its normalisation would not fit the pixels, or, with the classes in another order
  (a count that differs is refused before, by the checkpoint's shapes), every score would be of
  another class. A training dataset that no longer opens (moved since) leaves nothing to
  compare against."""
  try:
    trained = _training_dataset(config, run_config, "the data of")
  except setup.ConfigError:
    return
  if trained is None:
    return
  data = run_config["data"]
  if trained.dtype != info.dtype:
    raise setup.ConfigError(
        f"data.path: the images of {config.data.path} are {info.dtype}, but {config.checkpoint} "
        f"was trained on {trained.dtype} images (from {data['path']}); its normalisation would "
        "not fit them: convert the scenes to the training dataset's pixel type")
  if (info.class_names and len(trained.class_names) == len(info.class_names)
      and tuple(trained.class_names) != tuple(info.class_names)):
    raise setup.ConfigError(
        f"data.path: the classes of {config.data.path} ({', '.join(info.class_names)}) are not "
        f"those {config.checkpoint} was trained on ({', '.join(trained.class_names)}, from "
        f"{data['path']}); convert the scenes with the training dataset's class map")


def _image_nodata(info) -> float | None:
  """The image nodata value data_prep was given (--nodata), if finite: the one per-pixel trace
  of nodata an unlabelled record keeps (a NaN nodata was filled with 0 like other non-finite
  values, and the files' own nodata values are not recorded)."""
  value = (info.metadata.get("settings") or {}).get("nodata")
  return float(value) if value is not None and np.isfinite(value) else None


def _scenes(source) -> dict[str, list[int]]:
  """Record indices of each scene, in first-appearance order."""
  scenes = collections.OrderedDict()
  for i in range(len(source)):
    scenes.setdefault(str(source[i]["scene_id"]), []).append(i)
  return scenes


def _scene_shapes(info, split: str) -> dict[str, tuple[int, int]]:
  """Each scene's (height, width) as data_prep read it; empty for a dataset made before
  data_prep recorded them (its scenes then end at their last tile)."""
  entry = info.metadata["splits"][split]
  return {scene_id: tuple(shape) for scene_id, shape in
          zip(entry["scene_ids"], entry.get("scene_shapes", ()))}


def _assemble(source, indices: list[int], bands: int, nodata: float | None = None,
              shape: tuple[int, int] | None = None):
  """(image, label, crs, scene transform, (n, 4) tile windows) of one scene.

  The scene is `shape` (height, width) when given, else it ends at its last tile. Unlabelled
  records get a stand-in label: 255 (ignored) outside every tile and where each band equals
  the image `nodata`, else 0, so that the unscored pixels are found alike.
  """
  records = [source[i] for i in indices]
  windows = np.array([r["window"] for r in records], np.int64)
  height = int((windows[:, 0] + windows[:, 2]).max())
  width = int((windows[:, 1] + windows[:, 3]).max())
  if shape is not None:
    height, width = max(height, shape[0]), max(width, shape[1])
  image = np.zeros((height, width, bands), records[0]["image"].dtype)
  label = np.full((height, width), 255, np.uint8)
  for record, (row, col, h, w) in zip(records, windows):
    image[row:row + h, col:col + w] = record["image"]
    label[row:row + h, col:col + w] = record["label"] if "label" in record else 0
  if "label" not in records[0] and nodata is not None:
    label[(image == np.asarray(nodata).astype(image.dtype)).all(axis=-1)] = 255
  transform = predictions.scene_transform(records[0]["transform"], windows[0])
  return image, label, str(records[0]["crs"]), transform, windows


def _write_json(path: pathlib.Path, obj) -> None:
  files.write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


METRICS_MODES = ("ours", "reference")
METRICS, LISTING = "metrics.json", "predictions.json"  # the labelled and the unlabelled report

# Keys a rerun may change: they change neither the scores nor which outputs stay (the run
# replaces predictions/ whole, or removes it when write_predictions is off).
RERUN_KEYS = frozenset({"eval.batch_size", "write_predictions"})
PREDICTIONS = "predictions"
_PARTIAL = ".predictions.partial"  # the run's predictions until they are complete
_REPLACED = ".predictions.replaced"  # the previous run's, while they are being replaced


def _check_rerun(work: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """One-line refusal unless `work` is new or holds an evaluation with the same config
  (run_dir.claim has refused another stage's workdir)."""
  path = work / run_dir.CONFIG_FILE
  if not path.is_file():
    return
  try:
    stored = run_dir.flatten(json.loads(path.read_text()))
  except (OSError, ValueError, AttributeError) as e:
    raise setup.ConfigError(f"{path}: unreadable ({type(e).__name__}: {e}); use another "
                            "--workdir") from None
  changed = {k: v for k, v in run_dir.differing_keys(stored, config).items() if k not in RERUN_KEYS}
  if changed:
    listed = ", ".join(f"{k} {old!r} → {new!r}" for k, (old, new) in changed.items())
    raise setup.ConfigError(f"workdir {work} holds an evaluation with another config: {listed}; "
                            "use another --workdir")


def _remove(path: pathlib.Path) -> None:
  if path.is_symlink() or path.is_file():
    path.unlink()
  elif path.is_dir():
    shutil.rmtree(path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  setup.check_choices(config)  # also when called without train.py (the benchmark)
  setup.check_counts(config, {"eval.crop": 1, "eval.stride": 1, "eval.batch_size": 1})
  if config.eval.stride > config.eval.crop:
    raise setup.ConfigError(f"config key eval.stride is {config.eval.stride}; it must be at most "
                            f"eval.crop ({config.eval.crop}), or pixels between windows go unpredicted")
  if config.get("metrics_mode", "ours") not in METRICS_MODES:
    raise setup.ConfigError(f"config key metrics_mode is {config.metrics_mode!r}; expected one "
                            f"of {METRICS_MODES}")
  source, info = setup.open_split(config.data.path, config.data.split)
  if info.labelled:
    setup.check_labelled_pixels(source, info, "data.split", "there is nothing to score")
  if not info.labelled and not config.write_predictions:
    raise setup.ConfigError(f"write_predictions is False, but split {config.data.split!r} has no "
                            "labels to evaluate against: there would be nothing to do")
  if not config.checkpoint:
    raise setup.ConfigError("config key checkpoint is empty: set it to a fine-tuning run's workdir")
  run_config = run_dir.run_config_of(config.checkpoint, "checkpoint")
  if not info.labelled:
    info = _with_checkpoint_classes(info, config, run_config)
  norm_mode = _norm_mode(config, run_config)
  _check_like_training(info, config, run_config)
  setup.check_norm(norm_mode, info)
  norm = _normalisation(norm_mode, info, config, run_config)
  model = finetune.build_model(_model_config(config, run_config), info.num_classes)
  try:
    variables = checkpoint.load_variables(config.checkpoint)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise setup.ConfigError(f"checkpoint: {e}") from None
  _check_compatible(variables, model, info.num_bands, "checkpoint", config.checkpoint, run_config)
  with run_dir.claim(workdir, config) as claim:
    _check_rerun(claim.path, config)
    partial = claim.path / _PARTIAL
    if jax.process_index() == 0:
      _remove(partial)  # left by a run that was killed
      _remove(claim.path / _REPLACED)
      if config.write_predictions:
        partial.mkdir()
    _sync("evaluate: predictions folder made")
    try:
      confusion, file_stems, tile_iou = _predict(config, partial, source, info, model, variables,
                                                 norm)
      untiled = [scene for scene in info.metadata["splits"][config.data.split]["scene_ids"]
                 if scene not in file_stems]
      if not info.labelled:
        result = _report_predictions(config, claim, info, file_stems, untiled)
      else:
        result = _report(config, claim, info, confusion, len(file_stems), tile_iou, untiled)
      if untiled and jax.process_index() == 0:
        print(f"not predicted: {_scenes_count(len(untiled))} without a tile in the dataset (every "
              f"tile skipped as nodata by data_prep): {', '.join(untiled)}")
      return result
    except BaseException:
      shutil.rmtree(partial, ignore_errors=True)
      raise


def _predict(config, partial: pathlib.Path, source, info, model, variables, norm: dict):
  """(the split's confusion matrix, {scene id: file stem} of its scenes, and for metrics_mode
  'reference' (sum of per-tile IoUs, tile count), else None); writes this process's scenes'
  predictions into `partial`. An unlabelled split is predicted only (a zero matrix)."""
  local = parallel.make_data_mesh(jax.local_devices())
  batch = -(-config.eval.batch_size // local.size) * local.size
  variables = jax.device_put(variables, parallel.replicated_sharding(local))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                    in_shardings=(parallel.replicated_sharding(local), parallel.batch_sharding(local)))
  eval_cfg = recipes.config_from_dict(recipes.EvalConfig, {"norm": norm}, "eval")

  scenes = list(_scenes(source).items())
  file_stems = predictions.scene_file_stems([scene_id for scene_id, _ in scenes])
  mine = scenes[jax.process_index()::jax.process_count()]
  confusion = np.zeros((info.num_classes,) * 2, np.int64)
  per_tile = config.get("metrics_mode", "ours") == "reference" and info.labelled
  nodata = None if info.labelled else _image_nodata(info)
  shapes = _scene_shapes(info, config.data.split)
  tile_iou_sum, num_tiles = np.zeros(info.num_classes), 0
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  for scene_id, indices in tqdm(mine, desc=f"evaluate {config.data.split}", unit="scene",
                                disable=jax.process_index() != 0):
    image, label, crs, transform, windows = _assemble(source, indices, info.num_bands, nodata,
                                                       shapes.get(scene_id))
    normalised = recipes.eval_example({"image": image}, eval_cfg)["image"]
    logits = inference.sliding_window_logits(
        normalised, lambda x: forward(variables, x), crop=config.eval.crop,
        stride=config.eval.stride, batch_size=batch)
    classes = np.argmax(logits, axis=-1).astype(np.uint8)
    if info.labelled:
      confusion += metrics.confusion_matrix(label, classes, info.num_classes, info.ignore_index)
    if per_tile:
      # The reference scores each image of its list, here each tile of the split.
      for row, col, h, w in windows:
        tile_iou_sum += metrics.tile_class_iou(label[row:row + h, col:col + w],
                                               classes[row:row + h, col:col + w],
                                               info.num_classes, info.ignore_index)
        num_tiles += 1
    if config.write_predictions:
      try:
        paths = [predictions.inside(partial, f"{file_stems[scene_id]}_{kind}.tif")
                 for kind in ("class", "colour")]
      except ValueError as e:
        raise setup.ConfigError(f"scene {scene_id!r}: {e}") from None
      # Pixels the metrics do not score (image nodata, outside every tile, an ignored class)
      # get no prediction either.
      unscored = np.where(label == info.ignore_index, predictions.NODATA, classes)
      predictions.write_prediction(*paths, unscored, crs=crs or None, transform=transform,
                                   colours=info.class_colours, nodata=predictions.NODATA)
  if jax.process_count() > 1:
    confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
    tile_iou_sum = np.asarray(multihost_utils.process_allgather(tile_iou_sum)).sum(axis=0)
    num_tiles = int(np.asarray(multihost_utils.process_allgather(np.int64(num_tiles))).sum())
  _sync("evaluate: predictions written")
  return confusion, file_stems, (tile_iou_sum, num_tiles) if per_tile else None


def _scenes_count(n: int) -> str:
  return f"{n} scene{'' if n == 1 else 's'}"


def _report(config, claim: run_dir.Claim, info, confusion: np.ndarray, num_scenes: int,
            tile_iou, untiled: list[str]) -> dict:
  """metrics.json, confusion_matrix.png and predictions/ (process 0); prints the scores."""
  scores = metrics.compute_scores(confusion, info.class_names)
  result = scores.as_dict()
  result.update(split=config.data.split, checkpoint=run_dir.absolute_path(str(config.checkpoint)),
                num_scenes=num_scenes, scenes_without_tiles=untiled)
  if tile_iou is not None:
    tile_iou_sum, num_tiles = tile_iou
    mean = tile_iou_sum / num_tiles
    result["reference"] = {
        "miou_tile_mean": metrics.reference_tile_miou(mean[None]),
        "iou_tile_mean": dict(zip(info.class_names, mean.tolist())),
        "num_tiles": num_tiles}
  if jax.process_index() == 0:
    _replace_outputs(config, claim, METRICS, result, lambda png: predictions.write_confusion_matrix_png(
        png, confusion, info.class_names, title=f"{config.data.split}: {config.checkpoint}"))
    print(metrics.format_table(scores))
    if tile_iou is not None:
      print(_reference_lines(result["reference"]))
  return result


def _report_predictions(config, claim: run_dir.Claim, info, file_stems: dict[str, str],
                        untiled: list[str]) -> dict:
  """predictions.json (what was predicted, and where each scene's GeoTIFFs are) and predictions/
  (process 0); prints where they are."""
  result = {
      "split": config.data.split, "checkpoint": run_dir.absolute_path(str(config.checkpoint)),
      "num_scenes": len(file_stems), "class_names": list(info.class_names),
      "nodata": predictions.NODATA,
      "scenes": [{"scene_id": scene_id, **{kind: f"{PREDICTIONS}/{stem}_{kind}.tif"
                                           for kind in ("class", "colour")}}
                 for scene_id, stem in file_stems.items()],
      "scenes_without_tiles": untiled}
  if jax.process_index() == 0:
    _replace_outputs(config, claim, LISTING, result, None)
    print(f"split {config.data.split!r} has no labels, so nothing was scored; wrote the "
          f"predictions of {_scenes_count(len(file_stems))} (<scene>_class.tif, <scene>_colour.tif) to "
          f"{claim.path / PREDICTIONS}, listed in {claim.path / LISTING}")
  return result


def _replace_outputs(config, claim: run_dir.Claim, report: str, result: dict, write_figure) -> None:
  """predictions/ replaced by this run's, the confusion-matrix figure written by
  `write_figure(path)` (or removed when None), and `report` (METRICS or LISTING) written
  last: it marks the outputs complete. Either report of an earlier run goes first."""
  work = claim.path
  out, replaced, png = work / PREDICTIONS, work / _REPLACED, work / "confusion_matrix.png"
  for name in (METRICS, LISTING):
    (work / name).unlink(missing_ok=True)
  try:
    if write_figure is None:
      _remove(png)
    else:
      write_figure(png)
    claim.record_config("evaluate")
    if out.exists() or out.is_symlink():
      os.replace(out, replaced)
    if config.write_predictions:
      os.replace(work / _PARTIAL, out)
    _remove(replaced)
    _write_json(work / report, result)
  except BaseException:
    # Without the report the outputs left would be a mix of this run's and the last one's.
    for path in (out, replaced, png):
      _remove(path)
    raise


def _reference_lines(reference: dict) -> str:
  width = max(len("mIoU (reference)"), *(metrics.text_width(n) for n in reference["iou_tile_mean"]))
  lines = [f"the reference's scores (IoU per tile, a class absent from a tile scoring 0, "
           f"mean over {reference['num_tiles']} tiles):"]
  lines += [f"{metrics.pad(name, width)}  {100 * iou:6.2f}"
            for name, iou in reference["iou_tile_mean"].items()]
  lines.append(f"{'mIoU (reference)':<{width}}  {100 * reference['miou_tile_mean']:6.2f}   "
               "(ours, from the global matrix, is the mIoU above)")
  return "\n".join(lines)
