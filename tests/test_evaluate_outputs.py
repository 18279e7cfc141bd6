"""Evaluation writes only inside its workdir, whatever the scene ids; a workdir holds one
evaluation, whole or not at all; predictions leave unscored pixels as nodata; inputs are
normalised as the checkpoint was trained; a pretraining checkpoint is named as such.

Compile-free: the checkpoint is a zero-valued tree of the right shapes and the
sliding-window forward pass is replaced by constant logits; the dataset, the
scene assembly and the GeoTIFF writing are real.
"""
import importlib.util
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rasterio

from data_prep import convert, synthetic
from glc_jax import methods, predictions
from glc_jax.stages import evaluate, finetune, run_dir, setup

MODEL = {"depth": 18, "width": 0.125}


def _evaluate_config(data, checkpoint):
  spec = importlib.util.spec_from_file_location("eval_cfg", "configs/evaluate.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.path, config.data.split, config.checkpoint = str(data), "train", str(checkpoint)
  config.model.update(MODEL)
  config.eval.crop, config.eval.stride = 64, 32
  return config


def _zeros(shapes):
  return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_outputs")
  synthetic.write_corpus(root / "corpus", num_scenes=2, height=128, width=128, seed=4)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         progress=False)


@pytest.fixture
def fine_tuned(dataset, monkeypatch):
  """evaluate.run reads a zero fine-tuned checkpoint and predicts class 0 everywhere."""
  _, info = setup.open_split(str(dataset), "train")
  model = finetune.build_model(ml_collections.ConfigDict({"model": dict(MODEL, output_stride=16,
                                                                        dtype="float32")}),
                               info.num_classes)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                          jax.ShapeDtypeStruct((1, 64, 64, info.num_bands), jnp.float32))
  monkeypatch.setattr(evaluate.checkpoint, "load_variables", lambda path: _zeros(shapes))
  monkeypatch.setattr(evaluate.inference, "sliding_window_logits",
                      lambda image, *a, **k: np.zeros(image.shape[:2] + (info.num_classes,), np.float32))
  return info


def _rename_scenes(monkeypatch, names):
  """The split's tiles, each scene renamed: names[k] for the k-th scene."""
  real_open = setup.open_split

  class Renamed:
    def __init__(self, source):
      self.source = source
      order = list(dict.fromkeys(str(source[i]["scene_id"]) for i in range(len(source))))
      self.names = dict(zip(order, names, strict=True))

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      record = dict(self.source[i])
      record["scene_id"] = self.names[str(record["scene_id"])]
      return record

  def open_split(*args, **kwargs):
    source, info = real_open(*args, **kwargs)
    return Renamed(source), info

  monkeypatch.setattr(evaluate.setup, "open_split", open_split)


def test_scene_ids_cannot_write_outside_the_workdir(dataset, fine_tuned, tmp_path, monkeypatch):
  names = ["../../x", "a/b"]
  _rename_scenes(monkeypatch, names)
  work = tmp_path / "deep" / "er" / "eval"
  evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
  written = sorted(tmp_path.rglob("*.tif"))
  assert [p.parent for p in written] == [work / "predictions"] * 4, written
  kinds = {p.name: p.name.rsplit("_", 1)[1] for p in written}
  assert sorted(kinds.values()) == ["class.tif", "class.tif", "colour.tif", "colour.tif"]
  for path in written:
    with rasterio.open(path) as f:
      assert f.shape == (128, 128)
      if kinds[path.name] == "class.tif":
        assert (f.read(1) == 0).all()


def test_scene_file_stems_are_safe_readable_and_distinct():
  ids = ["top_potsdam_2_10", "a/b", "a_b", "a b", "../../x", "..", ".", "", "-rf", "Scene", "scene",
         "x" * 300, "x" * 301, "é/ü", "c:\\evil"]
  stems = predictions.scene_file_stems(ids)
  assert stems["top_potsdam_2_10"] == "top_potsdam_2_10" and stems["a_b"] == "a_b"
  assert stems["../../x"].startswith("x~")
  assert len({s.casefold() for s in stems.values()}) == len(ids)
  for stem in stems.values():
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._~-]*", stem) and len(stem) <= 100, stem


def test_outputs_never_follow_links_out_of_the_workdir(dataset, fine_tuned, tmp_path, monkeypatch):
  _rename_scenes(monkeypatch, ["s0", "s1"])
  config = _evaluate_config(dataset, tmp_path / "ft")
  work = tmp_path / "eval"
  evaluate.run(config, str(work))
  # Links planted where the outputs go: the previous predictions/ and the folder the next
  # run's predictions are first written to.
  for name in ("outside_old", "outside_partial"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "s0_class.tif").write_text("not yours")
  shutil.rmtree(work / "predictions")
  (work / "predictions").symlink_to(tmp_path / "outside_old")
  (work / ".predictions.partial").symlink_to(tmp_path / "outside_partial")
  evaluate.run(config, str(work))
  for name in ("outside_old", "outside_partial"):
    assert [p.name for p in (tmp_path / name).iterdir()] == ["s0_class.tif"]
    assert (tmp_path / name / "s0_class.tif").read_text() == "not yours"
  assert not (work / "predictions").is_symlink()
  assert sorted(p.name for p in (work / "predictions").iterdir()) == [
      "s0_class.tif", "s0_colour.tif", "s1_class.tif", "s1_colour.tif"]


def test_evaluate_on_a_busy_workdir_is_refused(dataset, fine_tuned, tmp_path):
  work = tmp_path / "eval"
  with run_dir.claim(work):
    with pytest.raises(run_dir.WorkdirBusyError):
      evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
    assert not (work / "predictions").exists()


@pytest.fixture
def pretrained(dataset, monkeypatch):
  """evaluate.run reads a zero GLCNet pretraining checkpoint of the evaluation model's size."""
  _, info = setup.open_split(str(dataset), "train")
  method = methods.create_method(ml_collections.ConfigDict(
      dict(method="glcnet", model=dict(MODEL, embed_dim=16))))
  view = jax.ShapeDtypeStruct((1, 64, 64, info.num_bands), jnp.float32)
  boxes = jax.ShapeDtypeStruct((1, 4, 4), jnp.int32)
  shapes = jax.eval_shape(lambda *x: method.model.init(jax.random.key(0), *x, train=False),
                          view, view, boxes, boxes)
  monkeypatch.setattr(evaluate.checkpoint, "load_variables", lambda path: _zeros(shapes))


def test_evaluating_a_pretraining_checkpoint_says_so(dataset, pretrained, tmp_path):
  with pytest.raises(setup.ConfigError, match=(
      r"^checkpoint: .*/pre is a pretraining checkpoint \(it has pretext layers a fine-tuned model "
      r"lacks: global_head, local_head\); fine-tune it first ")):
    evaluate.run(_evaluate_config(dataset, tmp_path / "pre"), str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_evaluating_a_pretraining_workdir_says_so(dataset, pretrained, tmp_path):
  (tmp_path / "pre").mkdir()
  model = dict(MODEL, output_stride=16, dtype="float32", embed_dim=16)
  (tmp_path / "pre" / "config.json").write_text(json.dumps({"stage": "pretrain", "model": model}))
  with pytest.raises(setup.ConfigError, match=(
      r"^checkpoint: .*/pre is a pretraining checkpoint \(its run's config.json says stage "
      r"'pretrain'\); fine-tune it first \(configs/finetune.py with init.path set to it\) and "
      r"evaluate the fine-tuning workdir$")):
    evaluate.run(_evaluate_config(dataset, tmp_path / "pre"), str(tmp_path / "eval"))


def _outputs(work):
  """{path under work: bytes} of the evaluation's outputs (not the lock or the cache)."""
  return {str(p.relative_to(work)): p.read_bytes() for p in sorted(work.rglob("*")) if p.is_file()}


def test_a_workdir_holds_one_evaluation(dataset, fine_tuned, tmp_path, monkeypatch):
  _rename_scenes(monkeypatch, ["s0", "s1"])
  config = _evaluate_config(dataset, tmp_path / "ft")
  work = tmp_path / "eval"
  evaluate.run(config, str(work))
  assert json.loads((work / "config.json").read_text()) == json.loads(
      json.dumps(config.to_dict(), default=str))
  first = _outputs(work)

  other = _evaluate_config(dataset, tmp_path / "ft2")
  with pytest.raises(setup.ConfigError, match=(
      r"^workdir .*/eval holds an evaluation with another config: checkpoint '.*/ft' → "
      r"'.*/ft2'; use another --workdir$")):
    evaluate.run(other, str(work))
  assert _outputs(work) == first

  # The same config (a batch size is no change) evaluates again; without predictions it
  # leaves none of the earlier run's.
  config.eval.batch_size, config.write_predictions = 3, False
  evaluate.run(config, str(work))
  assert not (work / "predictions").exists()
  assert sorted(_outputs(work)) == ["config.json", "confusion_matrix.png", "metrics.json"]


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_another_stages_workdir_is_refused(dataset, fine_tuned, tmp_path, stage):
  work = tmp_path / "run"
  work.mkdir()
  (work / "config.json").write_text(json.dumps({"stage": stage, "model": MODEL}))
  with pytest.raises(setup.ConfigError, match=rf"^workdir .*/run holds a {stage} run; use another --workdir$"):
    evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
  assert [p.name for p in work.iterdir()] == ["config.json"]


def _interrupt_at(monkeypatch, where: str, calls: int):
  """KeyboardInterrupt at the `calls`+1-th call of predictions.`where`; returns the calls made."""
  made = []
  real = getattr(predictions, where)

  def interrupted(*args, **kwargs):
    if len(made) == calls:
      raise KeyboardInterrupt
    made.append(real(*args, **kwargs))

  monkeypatch.setattr(evaluate.predictions, where, interrupted)
  return made


@pytest.mark.parametrize("where, calls", [("write_prediction", 1), ("write_confusion_matrix_png", 0)])
def test_an_interrupted_evaluation_leaves_whole_outputs_or_none(dataset, fine_tuned, tmp_path,
                                                               monkeypatch, where, calls):
  _rename_scenes(monkeypatch, ["s0", "s1"])
  config = _evaluate_config(dataset, tmp_path / "ft")
  fresh, work = tmp_path / "fresh", tmp_path / "eval"
  evaluate.run(config, str(work))
  first = _outputs(work)
  with monkeypatch.context() as patch:
    made = _interrupt_at(patch, where, calls)
    with pytest.raises(KeyboardInterrupt):
      evaluate.run(config, str(fresh))
    assert len(made) == calls
    assert not fresh.exists()  # made by the run, left empty, so removed
    with pytest.raises(KeyboardInterrupt):
      evaluate.run(config, str(work))
  if where == "write_prediction":  # before anything was replaced: the last run's outputs
    assert _outputs(work) == first
  else:  # while they were being replaced: none
    assert sorted(p.name for p in work.iterdir()) == ["config.json"]
  evaluate.run(config, str(work))
  assert sorted(_outputs(work)) == sorted(first)


def test_unscored_pixels_are_nodata_in_the_predictions(dataset, fine_tuned, tmp_path, monkeypatch):
  """Label pixels set to 255 (a nodata strip of the image, as data_prep marks it) are nodata in
  the class GeoTIFF, black in the colour GeoTIFF, and not counted by the metrics."""
  real_open = setup.open_split

  class Strip:
    """Scene 0's tiles at column 0 with their first 20 label columns ignored."""
    def __init__(self, source):
      self.source = source
      self.first = str(source[0]["scene_id"])

    def __len__(self):
      return len(self.source)

    def __getitem__(self, i):
      record = dict(self.source[i])
      if str(record["scene_id"]) == self.first and record["window"][1] == 0:
        record["label"] = record["label"].copy()
        record["label"][:, :20] = 255
      return record

  monkeypatch.setattr(evaluate.setup, "open_split",
                      lambda *a, **k: (lambda s, i: (Strip(s), i))(*real_open(*a, **k)))
  work = tmp_path / "eval"
  result = evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
  first = str(real_open(str(dataset), "train")[0][0]["scene_id"])
  colour_of_class_0 = np.asarray(fine_tuned.class_colours[0], np.uint8)
  for path in sorted((work / "predictions").glob("*_class.tif")):
    with rasterio.open(path) as f:
      classes, nodata = f.read(1), f.nodata
    with rasterio.open(str(path).replace("_class.tif", "_colour.tif")) as f:
      rgb = np.moveaxis(f.read(), 0, -1)
    expected = np.zeros((128, 128), np.uint8)
    if path.name.startswith(first):
      expected[:, :20] = 255
    assert nodata == 255
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_array_equal(rgb, np.where((expected == 255)[..., None], 0, colour_of_class_0))
  assert result["num_pixels"] == 2 * 128 * 128 - 128 * 20


def _trained_with(tmp_path, norm, dataset=None):
  """A fine-tuning workdir whose config.json says it was trained with data.norm `norm` (on
  `dataset`, if given)."""
  ft = tmp_path / "ft"
  ft.mkdir()
  data = {"norm": norm} if dataset is None else {"norm": norm, "path": str(dataset)}
  (ft / "config.json").write_text(json.dumps(
      {"stage": "finetune", "data": data, "model": dict(MODEL, output_stride=16)}))
  return ft


@pytest.mark.parametrize("step_dir", ["", "best/7", "checkpoints/12"])
def test_evaluation_normalises_as_the_checkpoint_was_trained(dataset, fine_tuned, tmp_path, monkeypatch,
                                                             step_dir):
  """The checkpoint is the run's workdir or one step directory in it, whose run config is
  the workdir's."""
  seen = []
  monkeypatch.setattr(evaluate.inference, "sliding_window_logits", lambda image, *a, **k: (
      seen.append(image), np.zeros(image.shape[:2] + (fine_tuned.num_classes,), np.float32))[1])
  checkpoint = _trained_with(tmp_path, "stats") / step_dir
  if step_dir:
    (checkpoint / "state").mkdir(parents=True)
  evaluate.run(_evaluate_config(dataset, checkpoint), str(tmp_path / "eval"))
  # The oracle: the training split's band statistics as data_prep recorded them.
  stats = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["band_stats"]
  source, _ = setup.open_split(str(dataset), "train")
  scene = [source[i] for i in range(len(source)) if source[i]["scene_id"] == source[0]["scene_id"]]
  image = np.zeros((128, 128, fine_tuned.num_bands), np.float64)
  for record in scene:
    row, col, h, w = record["window"]
    image[row:row + h, col:col + w] = record["image"]
  expected = (image - np.asarray(stats["mean"])) / np.asarray(stats["std"])
  np.testing.assert_allclose(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_new_scenes_are_normalised_with_the_statistics_the_checkpoint_was_trained_with(
    dataset, fine_tuned, tmp_path, monkeypatch):
  """Scenes converted on their own have their own band statistics; the model saw those of its
  training dataset (the run's data.path)."""
  synthetic.write_corpus(tmp_path / "new", num_scenes=1, height=128, width=128, seed=11)
  new = convert.convert(str(tmp_path / "new" / "images"), tmp_path / "new_ds",
                        str(tmp_path / "new" / "labels"), class_map=str(tmp_path / "new" / "class_dict.csv"),
                        tile=64, workers=0, progress=False)
  seen = []
  monkeypatch.setattr(evaluate.inference, "sliding_window_logits", lambda image, *a, **k: (
      seen.append(image), np.zeros(image.shape[:2] + (fine_tuned.num_classes,), np.float32))[1])
  evaluate.run(_evaluate_config(new, _trained_with(tmp_path, "stats", dataset)), str(tmp_path / "eval"))
  trained = json.loads((dataset / "metadata.json").read_text())["splits"]["train"]["band_stats"]
  own = json.loads((new / "metadata.json").read_text())["splits"]["train"]["band_stats"]
  assert not np.allclose(trained["mean"], own["mean"], rtol=1e-3)
  source, _ = setup.open_split(str(new), "train")
  image = np.zeros((128, 128, fine_tuned.num_bands), np.float64)
  for record in (source[i] for i in range(len(source))):
    row, col, h, w = record["window"]
    image[row:row + h, col:col + w] = record["image"]
  expected = (image - np.asarray(trained["mean"])) / np.asarray(trained["std"])
  np.testing.assert_allclose(seen[0], expected, rtol=1e-5, atol=1e-5)


def test_a_relative_training_dataset_not_found_from_here_is_one_line(dataset, fine_tuned, tmp_path):
  config = _evaluate_config(dataset, _trained_with(tmp_path, "stats", "runs/elsewhere/dataset"))
  with pytest.raises(setup.ConfigError, match=(
      r"^checkpoint: .*/ft was trained with data.norm 'stats' on the band statistics of "
      r"runs/elsewhere/dataset, a path relative to the folder the training ran in and not found "
      r"from this one; run from that folder$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_a_dataset_naming_the_classes_in_another_order_is_refused(dataset, fine_tuned, tmp_path):
  """Same class count, so the checkpoint fits; every score would be of the wrong class."""
  lines = (dataset.parent / "corpus" / "class_dict.csv").read_text().splitlines()
  (tmp_path / "swapped.csv").write_text("\n".join([lines[0], lines[2], lines[1], *lines[3:]]) + "\n")
  swapped = convert.convert(str(dataset.parent / "corpus" / "images"), tmp_path / "swapped",
                            str(dataset.parent / "corpus" / "labels"),
                            class_map=str(tmp_path / "swapped.csv"), tile=64, workers=0,
                            progress=False)
  config = _evaluate_config(swapped, _trained_with(tmp_path, "reference", dataset))
  with pytest.raises(setup.ConfigError, match=(
      r"^data.path: the classes of .*/swapped \(building, impervious_surfaces, low_vegetation, "
      r"tree, car, clutter\) are not those .*/ft was trained on \(impervious_surfaces, building, "
      r".*, from .*\); convert the scenes with the training dataset's class map$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def uint16_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval_uint16")
  synthetic.write_corpus(root / "corpus", num_scenes=2, height=128, width=128, seed=4, dtype="uint16")
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         progress=False)


@pytest.mark.parametrize("trained_on, message", [
    ("dataset", r"data.path: the images of .*/ds are uint16, but .*/ft was trained on uint8 images "
                r"\(from .*\); its normalisation would not fit them: convert the scenes to the "
                r"training dataset's pixel type"),
    (None, r"config key data.norm is 'reference', which scales 8-bit pixels \(x/255\), but this "
           r"dataset's images are uint16; .*"),
])
def test_pixels_of_another_type_than_the_training_data_are_refused(
    dataset, uint16_dataset, fine_tuned, tmp_path, trained_on, message):
  """Scaled as the 8-bit training data (x/255), uint16 pixels would reach ~400, silently."""
  checkpoint = _trained_with(tmp_path, "reference", dataset if trained_on else None)
  with pytest.raises(setup.ConfigError, match=f"^{message}$"):
    evaluate.run(_evaluate_config(uint16_dataset, checkpoint), str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_a_stride_longer_than_the_window_is_refused_before_loading(dataset, tmp_path):
  config = _evaluate_config(dataset, tmp_path / "no_checkpoint_needed")
  config.eval.stride = 65
  with pytest.raises(setup.ConfigError, match=(
      r"^config key eval.stride is 65; it must be at most eval.crop \(64\), or pixels between "
      r"windows go unpredicted$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_another_norm_than_the_checkpoints_is_refused(dataset, fine_tuned, tmp_path):
  config = _evaluate_config(dataset, _trained_with(tmp_path, "reference"))
  config.data.norm = "stats"
  with pytest.raises(setup.ConfigError, match=(
      r"^data.norm is 'stats', but .*/ft was trained with 'reference'; leave data.norm unset to "
      r"use the checkpoint's$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("stage", ["finetune", "pretrain"])
def test_training_in_an_evaluation_workdir_is_refused(dataset, fine_tuned, tmp_path, stage):
  work = tmp_path / "eval"
  evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
  recorded = (work / "config.json").read_text()
  with pytest.raises(setup.ConfigError, match=r"^workdir .*/eval holds an evaluate run; use another --workdir$"):
    with run_dir.claim(work, ml_collections.ConfigDict({"stage": stage})):
      pass
  assert (work / "config.json").read_text() == recorded


@pytest.fixture(scope="module")
def unlabelled(dataset, tmp_path_factory):
  """The labelled dataset's scenes as a 'test' split without labels, converted with --nodata 0
  after scene 0's first 20 columns were set to 0 in every band (a nodata strip)."""
  root = tmp_path_factory.mktemp("eval_unlabelled")
  images = root / "images"
  shutil.copytree(dataset.parent / "corpus" / "images", images)
  with rasterio.open(images / "scene_000.tif", "r+") as f:
    pixels = f.read()
    pixels[:, :, :20] = 0
    f.write(pixels)
  return convert.convert(str(images), root / "ds", None, tile=64, workers=0, progress=False,
                         nodata=0, max_nodata_fraction=1.0, split_fractions={"test": 1.0})


def _unlabelled_config(unlabelled, checkpoint):
  config = _evaluate_config(unlabelled, checkpoint)
  config.data.split = "test"
  return config


def test_an_unlabelled_split_is_predicted_and_listed(dataset, unlabelled, fine_tuned, tmp_path,
                                                     capsys):
  """Georeferenced class and colour GeoTIFFs as for a labelled split, in the classes of the
  checkpoint's training dataset, image nodata as nodata; predictions.json lists them; no scores."""
  work = tmp_path / "eval"
  evaluate.run(_unlabelled_config(unlabelled, _trained_with(tmp_path, "reference", dataset)), str(work))
  assert sorted(p.name for p in work.iterdir() if not p.name.startswith(".")) == [
      "config.json", "predictions", "predictions.json"]
  listing = json.loads((work / "predictions.json").read_text())
  labelled = json.loads((dataset / "metadata.json").read_text())
  assert listing["split"] == "test" and listing["num_scenes"] == 2 and listing["nodata"] == 255
  assert listing["class_names"] == labelled["class_names"]
  assert [s["scene_id"] for s in listing["scenes"]] == ["scene_000", "scene_001"]
  colour_of_class_0 = np.asarray(labelled["class_colours"][0], np.uint8)
  for scene in listing["scenes"]:
    with rasterio.open(dataset.parent / "corpus" / "images" / f"{scene['scene_id']}.tif") as f:
      crs, transform = f.crs, f.transform
    with rasterio.open(work / scene["class"]) as f:
      assert (f.crs, f.transform, f.nodata) == (crs, transform, 255)
      classes = f.read(1)
      assert f.colormap(1)[0][:3] == tuple(colour_of_class_0)
    with rasterio.open(work / scene["colour"]) as f:
      assert (f.crs, f.transform) == (crs, transform)
      rgb = np.moveaxis(f.read(), 0, -1)
    expected = np.zeros((128, 128), np.uint8)
    if scene["scene_id"] == "scene_000":
      expected[:, :20] = 255
    np.testing.assert_array_equal(classes, expected)
    np.testing.assert_array_equal(rgb, np.where((expected == 255)[..., None], 0, colour_of_class_0))
  printed = capsys.readouterr().out
  assert f"predictions of 2 scenes" in printed and str(work / "predictions.json") in printed


@pytest.fixture(scope="module")
def trailing_nodata(dataset, tmp_path_factory):
  """The scenes without labels, scene 0's last 64 rows nodata (0) in every band, converted so
  that its bottom tiles are dropped."""
  root = tmp_path_factory.mktemp("eval_trailing")
  images = root / "images"
  shutil.copytree(dataset.parent / "corpus" / "images", images)
  with rasterio.open(images / "scene_000.tif", "r+") as f:
    pixels = f.read()
    pixels[:, 64:] = 0
    f.write(pixels)
  return convert.convert(str(images), root / "ds", None, tile=64, workers=0, progress=False,
                         nodata=0, max_nodata_fraction=0.5, split_fractions={"test": 1.0})


def test_predictions_cover_the_whole_scene_when_its_last_tiles_were_dropped(
    dataset, trailing_nodata, fine_tuned, tmp_path):
  """The prediction GeoTIFF lies on its source image pixel for pixel, the rows that gave no
  tile as nodata, rather than ending at the last tile kept."""
  assert json.loads((trailing_nodata / "metadata.json").read_text())["splits"]["test"][
      "num_skipped_tiles"] == 2
  work = tmp_path / "eval"
  evaluate.run(_unlabelled_config(trailing_nodata, _trained_with(tmp_path, "reference", dataset)),
               str(work))
  listing = json.loads((work / "predictions.json").read_text())
  with rasterio.open(dataset.parent / "corpus" / "images" / "scene_000.tif") as f:
    source = (f.height, f.width, f.crs, f.transform)
  with rasterio.open(work / listing["scenes"][0]["class"]) as f:
    assert (f.height, f.width, f.crs, f.transform) == source
    classes = f.read(1)
  expected = np.zeros((128, 128), np.uint8)
  expected[64:] = 255
  np.testing.assert_array_equal(classes, expected)


def test_a_scene_without_a_tile_is_named_as_not_predicted(dataset, fine_tuned, tmp_path, capsys,
                                                         caplog, monkeypatch):
  """data_prep dropped every tile of scene_001 (all nodata): the scene is named, not just
  missing from the predictions."""
  caplog.set_level("WARNING", logger="data_prep")
  images = tmp_path / "images"
  shutil.copytree(dataset.parent / "corpus" / "images", images)
  with rasterio.open(images / "scene_001.tif", "r+") as f:
    f.write(f.read() * 0)
  data = convert.convert(str(images), tmp_path / "ds", None, tile=64, workers=0, progress=False,
                         nodata=0, split_fractions={"test": 1.0})
  assert (f"{images / 'scene_001.tif'}: every tile was skipped as mostly nodata "
          "(--max-nodata-fraction); the scene has no tiles in the dataset") in caplog.messages
  work = tmp_path / "eval"
  _trained_with(tmp_path, "reference", dataset)
  config = _unlabelled_config(data, "ft")
  monkeypatch.chdir(tmp_path)
  evaluate.run(config, str(work))
  listing = json.loads((work / "predictions.json").read_text())
  assert listing["checkpoint"] == os.path.abspath("ft")  # as config.json keeps it
  assert [s["scene_id"] for s in listing["scenes"]] == ["scene_000"]
  assert listing["scenes_without_tiles"] == ["scene_001"]
  assert capsys.readouterr().out.splitlines()[-2:] == [
      f"split 'test' has no labels, so nothing was scored; wrote the predictions of 1 scene "
      f"(<scene>_class.tif, <scene>_colour.tif) to {work / 'predictions'}, listed in "
      f"{work / 'predictions.json'}",
      "not predicted: 1 scene without a tile in the dataset (every tile skipped as nodata by "
      "data_prep): scene_001"]


def test_an_unlabelled_split_without_class_names_is_refused(unlabelled, fine_tuned, tmp_path):
  with pytest.raises(setup.ConfigError, match=(
      r"^data.path: split 'test' has no labels and names no classes, and .*/ft has no run config "
      r"naming its training dataset; convert the scenes with data_prep --class-map to name the "
      r"classes$")):
    evaluate.run(_unlabelled_config(unlabelled, tmp_path / "ft"), str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_an_unlabelled_split_without_predictions_is_refused(dataset, unlabelled, fine_tuned,
                                                            tmp_path):
  config = _unlabelled_config(unlabelled, _trained_with(tmp_path, "reference", dataset))
  config.write_predictions = False
  with pytest.raises(setup.ConfigError, match=(
      r"^write_predictions is False, but split 'test' has no labels to evaluate against: there "
      r"would be nothing to do$")):
    evaluate.run(config, str(tmp_path / "eval"))
  assert not (tmp_path / "eval").exists()


def test_an_interrupted_prediction_leaves_the_last_outputs(dataset, unlabelled, fine_tuned, tmp_path,
                                                          monkeypatch):
  config = _unlabelled_config(unlabelled, _trained_with(tmp_path, "reference", dataset))
  work = tmp_path / "eval"
  evaluate.run(config, str(work))
  first = _outputs(work)
  with monkeypatch.context() as patch:
    _interrupt_at(patch, "write_prediction", 1)
    with pytest.raises(KeyboardInterrupt):
      evaluate.run(config, str(work))
  assert _outputs(work) == first
