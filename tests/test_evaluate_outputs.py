"""Evaluation writes only inside its workdir, whatever the scene ids, and names a pretraining
checkpoint as such.

Compile-free: the checkpoint is a zero-valued tree of the right shapes and the
sliding-window forward pass is replaced by constant logits; the dataset, the
scene assembly and the GeoTIFF writing are real.
"""
import importlib.util
import json
import re

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


def test_an_output_that_resolves_outside_is_refused(dataset, fine_tuned, tmp_path, monkeypatch):
  _rename_scenes(monkeypatch, ["s0", "s1"])
  outside = tmp_path / "outside.tif"
  outside.write_text("not yours")
  work = tmp_path / "eval"
  (work / "predictions").mkdir(parents=True)
  (work / "predictions" / "s0_class.tif").symlink_to(outside)
  with pytest.raises(setup.ConfigError, match=r"^scene 's0': .*s0_class.tif resolves to .*outside.tif, "
                                              r"outside .*predictions; refusing to write it$"):
    evaluate.run(_evaluate_config(dataset, tmp_path / "ft"), str(work))
  assert outside.read_text() == "not yours"


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
