"""Evaluation of a fine-tuned model over whole scenes of a split.

Tiles are put back into their scenes (by scene_id and window), each scene is
predicted with overlapping sliding windows whose logits are averaged, and every
pixel of the split enters one confusion matrix. Writes to the workdir:
metrics.json, confusion_matrix.png and, per scene, predictions/<scene>_class.tif
(class indices) and predictions/<scene>_colour.tif, both carrying the scene's
CRS and geotransform. Scene ids become file names through
predictions.scene_file_stems (an id that is no safe file name gets a readable,
unique replacement), and no file is written outside predictions/.

Config keys (configs/evaluate.py): data.path, data.split, data.norm;
checkpoint (a fine-tuning workdir: its best state); model (depth,
output_stride, width, dtype), taken from the checkpoint run's config.json
when model_from_checkpoint is True; eval.crop, eval.stride, eval.batch_size;
write_predictions; metrics_mode: 'ours' (one global confusion matrix) or
'reference' (also the reference's mIoU: per-class IoU on each tile of the
split, a class absent from a tile scoring 0, averaged over tiles then classes;
metrics.json key "reference", printed under ours and named as such).
"""
from __future__ import annotations

import collections
import json
import pathlib

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from glc_jax import checkpoint, files, inference, metrics, parallel, predictions
from glc_jax.data import pipelines, recipes
from glc_jax.stages import finetune, run_dir, setup


def _model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  run_config = pathlib.Path(config.checkpoint) / "config.json"
  if config.model_from_checkpoint and run_config.is_file():
    saved = json.loads(run_config.read_text()).get("model")
    if saved:
      return ml_collections.ConfigDict({"model": saved})
  return ml_collections.ConfigDict({"model": config.model.to_dict()})


def _pretraining_checkpoint(checkpoint_path: str, variables, expected) -> str | None:
  """Why `variables` look like a pretraining checkpoint (its config.json, or pretext heads), or None."""
  run_config = pathlib.Path(checkpoint_path) / "config.json"
  if run_config.is_file():
    try:
      stage = json.loads(run_config.read_text()).get("stage")
    except ValueError:
      stage = None
    if stage == "pretrain":
      return "its run's config.json says stage 'pretrain'"
  extra = sorted(set(variables["params"]) - set(expected["params"]))
  if extra and "backbone" in variables["params"]:
    return f"it has pretext layers a fine-tuned model lacks: {', '.join(extra)}"
  return None


def _check_compatible(variables, model, num_bands: int, where: str, checkpoint_path: str):
  """One-line error if the checkpoint does not fit the model and dataset."""
  expected = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                            jax.ShapeDtypeStruct((1, 64, 64, num_bands), np.float32))
  why = _pretraining_checkpoint(checkpoint_path, variables, expected)
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


def _scenes(source) -> dict[str, list[int]]:
  """Record indices of each scene, in first-appearance order."""
  scenes = collections.OrderedDict()
  for i in range(len(source)):
    scenes.setdefault(str(source[i]["scene_id"]), []).append(i)
  return scenes


def _assemble(source, indices: list[int], bands: int):
  """(image, label or None, crs, scene transform, (n, 4) tile windows) of one scene."""
  records = [source[i] for i in indices]
  windows = np.array([r["window"] for r in records], np.int64)
  height = int((windows[:, 0] + windows[:, 2]).max())
  width = int((windows[:, 1] + windows[:, 3]).max())
  image = np.zeros((height, width, bands), records[0]["image"].dtype)
  label = np.full((height, width), 255, np.uint8) if "label" in records[0] else None
  for record, (row, col, h, w) in zip(records, windows):
    image[row:row + h, col:col + w] = record["image"]
    if label is not None:
      label[row:row + h, col:col + w] = record["label"]
  transform = predictions.scene_transform(records[0]["transform"], windows[0])
  return image, label, str(records[0]["crs"]), transform, windows


def _write_json(path: pathlib.Path, obj) -> None:
  files.write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


METRICS_MODES = ("ours", "reference")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  setup.check_counts(config, {"eval.crop": 1, "eval.stride": 1, "eval.batch_size": 1})
  if config.get("metrics_mode", "ours") not in METRICS_MODES:
    raise setup.ConfigError(f"config key metrics_mode is {config.metrics_mode!r}; expected one "
                            f"of {METRICS_MODES}")
  source, info = setup.open_split(config.data.path, config.data.split)
  if not info.labelled:
    raise setup.ConfigError(f"data.path: split {config.data.split!r} has no labels to evaluate against")
  if not config.checkpoint:
    raise setup.ConfigError("config key checkpoint is empty: set it to a fine-tuning run's workdir")
  model = finetune.build_model(_model_config(config), info.num_classes)
  try:
    variables = checkpoint.load_variables(config.checkpoint)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise setup.ConfigError(f"checkpoint: {e}") from None
  _check_compatible(variables, model, info.num_bands, "checkpoint", config.checkpoint)
  with run_dir.claim(workdir):
    return _evaluate(config, pathlib.Path(workdir), source, info, model, variables)


def _evaluate(config, work: pathlib.Path, source, info, model, variables) -> dict:
  local = parallel.make_data_mesh(jax.local_devices())
  batch = -(-config.eval.batch_size // local.size) * local.size
  variables = jax.device_put(variables, parallel.replicated_sharding(local))
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False),
                    in_shardings=(parallel.replicated_sharding(local), parallel.batch_sharding(local)))
  norm = pipelines.dataset_data_config(info, norm_mode=config.data.norm)["norm"]
  eval_cfg = recipes.config_from_dict(recipes.EvalConfig, {"norm": norm}, "eval")

  out = work / "predictions"
  scenes = list(_scenes(source).items())
  file_stems = predictions.scene_file_stems([scene_id for scene_id, _ in scenes])
  out.mkdir(parents=True, exist_ok=True)
  mine = scenes[jax.process_index()::jax.process_count()]
  confusion = np.zeros((info.num_classes,) * 2, np.int64)
  per_tile = config.get("metrics_mode", "ours") == "reference"
  tile_iou_sum, num_tiles = np.zeros(info.num_classes), 0
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  for scene_id, indices in tqdm(mine, desc=f"evaluate {config.data.split}", unit="scene",
                                disable=jax.process_index() != 0):
    image, label, crs, transform, windows = _assemble(source, indices, info.num_bands)
    normalised = recipes.eval_example({"image": image}, eval_cfg)["image"]
    logits = inference.sliding_window_logits(
        normalised, lambda x: forward(variables, x), crop=config.eval.crop,
        stride=config.eval.stride, batch_size=batch)
    classes = np.argmax(logits, axis=-1).astype(np.uint8)
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
        paths = [predictions.inside(out, f"{file_stems[scene_id]}_{kind}.tif")
                 for kind in ("class", "colour")]
      except ValueError as e:
        raise setup.ConfigError(f"scene {scene_id!r}: {e}") from None
      predictions.write_prediction(*paths, classes, crs=crs or None, transform=transform,
                                   colours=info.class_colours)
  if jax.process_count() > 1:
    confusion = np.asarray(multihost_utils.process_allgather(confusion)).sum(axis=0)
    tile_iou_sum = np.asarray(multihost_utils.process_allgather(tile_iou_sum)).sum(axis=0)
    num_tiles = int(np.asarray(multihost_utils.process_allgather(np.int64(num_tiles))).sum())
  scores = metrics.compute_scores(confusion, info.class_names)
  result = scores.as_dict()
  result.update(split=config.data.split, checkpoint=str(config.checkpoint), num_scenes=len(scenes))
  if per_tile:
    tile_iou = tile_iou_sum / num_tiles
    result["reference"] = {
        "miou_tile_mean": metrics.reference_tile_miou(tile_iou[None]),
        "iou_tile_mean": dict(zip(info.class_names, tile_iou.tolist())),
        "num_tiles": num_tiles}
  if jax.process_index() == 0:
    _write_json(work / "metrics.json", result)
    predictions.write_confusion_matrix_png(work / "confusion_matrix.png", confusion, info.class_names,
                                           title=f"{config.data.split}: {config.checkpoint}")
    print(metrics.format_table(scores))
    if per_tile:
      print(_reference_lines(result["reference"]))
  return result


def _reference_lines(reference: dict) -> str:
  width = max(8, *(len(n) for n in reference["iou_tile_mean"]))
  lines = [f"the reference's scores (IoU per tile, a class absent from a tile scoring 0, "
           f"mean over {reference['num_tiles']} tiles):"]
  lines += [f"{name:<{width}}  {100 * iou:6.2f}" for name, iou in reference["iou_tile_mean"].items()]
  lines.append(f"{'mIoU (reference)':<{width}}  {100 * reference['miou_tile_mean']:6.2f}   "
               "(ours, from the global matrix, is the mIoU above)")
  return "\n".join(lines)
