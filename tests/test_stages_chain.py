"""Fine-tuning then evaluation on synthetic georeferenced scenes: GeoTIFF predictions carry
the source scene's CRS and geotransform, metrics.json agrees with those predictions and
the source labels, and a checkpoint that does not fit the data is a one-line error.
"""
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import convert, synthetic
from glc_jax.stages import evaluate, finetune, setup

CRS, GSD = "EPSG:25832", 0.5  # not the synthetic corpus's default, so a default cannot pass
HEIGHT, WIDTH, TILE = 160, 128, 64  # 160 is no multiple of the tile: edge tiles overlap
NUM_CLASSES = len(synthetic.CLASS_NAMES)


def _load_config(name: str, variant: str | None = None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _dataset(root: pathlib.Path, num_scenes: int, split_fractions: dict, bands: int = 4,
             class_map: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
  """(dataset, corpus) of `num_scenes` synthetic scenes in CRS with GSD."""
  corpus = root / "corpus"
  synthetic.write_corpus(corpus, num_scenes=num_scenes, height=HEIGHT, width=WIDTH, seed=5,
                         bands=bands, crs=CRS, gsd=GSD)
  dataset = convert.convert(str(corpus / "images"), root / "dataset", str(corpus / "labels"),
                            class_map=class_map or str(corpus / "class_dict.csv"), tile=TILE,
                            split_fractions=split_fractions, workers=0, progress=False)
  return dataset, corpus


def _evaluate_config(data: pathlib.Path, checkpoint: pathlib.Path):
  config = _load_config("evaluate")
  config.data.path = str(data)
  config.checkpoint = str(checkpoint)
  config.eval.crop, config.eval.stride, config.eval.batch_size = TILE, TILE // 2, 8
  return config


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  """A 1-epoch fine-tuning from random init, evaluated on the test split's scenes."""
  root = tmp_path_factory.mktemp("chain")
  data, corpus = _dataset(root, num_scenes=5,
                          split_fractions={"train": 0.6, "val": 0.2, "test": 0.2})
  config = _load_config("finetune", "random,tiny")
  config.data.path = str(data)
  config.data.label_fraction = None
  config.data.num_workers = 0
  config.input.crop_size = TILE
  config.model.depth, config.model.width = 18, 0.125
  config.epochs = 1
  finetune.run(config, str(root / "finetune"))
  result = evaluate.run(_evaluate_config(data, root / "finetune"), str(root / "evaluate"))
  return {"root": root, "data": data, "corpus": corpus, "finetune": root / "finetune",
          "evaluate": root / "evaluate", "result": result}


def _test_scenes(data: pathlib.Path) -> list[str]:
  source, _ = setup.open_split(str(data), "test")
  return sorted({str(source[i]["scene_id"]) for i in range(len(source))})


@pytest.mark.slow
def test_predictions_carry_the_source_georeference(chain):
  scenes = _test_scenes(chain["data"])
  out = chain["evaluate"] / "predictions"
  assert sorted(p.name for p in out.iterdir()) == sorted(
      f"{s}_{kind}.tif" for s in scenes for kind in ("class", "colour"))
  colours = np.asarray(synthetic.CLASS_COLOURS, np.uint8)
  for scene in scenes:
    with rasterio.open(chain["corpus"] / "images" / f"{scene}.tif") as src:
      source_crs, source_transform, shape = src.crs, src.transform, (src.height, src.width)
    assert source_crs == rasterio.crs.CRS.from_string(CRS) and source_transform.a == GSD
    with rasterio.open(out / f"{scene}_class.tif") as tif:
      assert (tif.count, tif.dtypes[0]) == (1, "uint8")
      assert tif.crs == source_crs
      # Metres; the scene transform is recomposed from a tile's, exactly for the (0, 0) tile.
      np.testing.assert_allclose(tuple(tif.transform)[:6], tuple(source_transform)[:6], rtol=0,
                                 atol=1e-9)
      assert (tif.height, tif.width) == shape
      classes = tif.read(1)
    assert classes.max() < NUM_CLASSES
    with rasterio.open(out / f"{scene}_colour.tif") as tif:
      assert tif.count == 3 and tif.crs == source_crs
      np.testing.assert_allclose(tuple(tif.transform)[:6], tuple(source_transform)[:6], rtol=0,
                                 atol=1e-9)
      np.testing.assert_array_equal(np.moveaxis(tif.read(), 0, -1), colours[classes])


@pytest.mark.slow
def test_metrics_agree_with_the_written_predictions_and_source_labels(chain):
  # The oracle: a confusion matrix counted here from the source label GeoTIFFs and the
  # written class GeoTIFFs, and the scores computed from it with the textbook formulas.
  expected = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
  for scene in _test_scenes(chain["data"]):
    with rasterio.open(chain["corpus"] / "labels" / f"{scene}.tif") as tif:
      truth = tif.read(1).astype(np.int64)
    with rasterio.open(chain["evaluate"] / "predictions" / f"{scene}_class.tif") as tif:
      predicted = tif.read(1).astype(np.int64)
    expected += np.bincount((truth * NUM_CLASSES + predicted).ravel(),
                            minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
  saved = json.loads((chain["evaluate"] / "metrics.json").read_text())
  assert saved == json.loads(json.dumps(chain["result"]))
  np.testing.assert_array_equal(np.asarray(saved["confusion_matrix"]), expected)
  assert saved["num_pixels"] == expected.sum() == HEIGHT * WIDTH * len(_test_scenes(chain["data"]))

  n = expected.sum()
  rows, cols, hits = expected.sum(1), expected.sum(0), np.diag(expected)
  chance = (rows * cols).sum() / n ** 2
  present = (rows + cols) > 0
  iou = hits[present] / (rows + cols - hits)[present]
  assert saved["overall_accuracy"] == pytest.approx(hits.sum() / n, abs=1e-12)
  assert saved["kappa"] == pytest.approx((hits.sum() / n - chance) / (1 - chance), abs=1e-12)
  assert saved["miou"] == pytest.approx(iou.mean(), abs=1e-12)
  assert saved["classes_scored"] == [c for c, p in zip(synthetic.CLASS_NAMES, present) if p]
  assert (chain["evaluate"] / "confusion_matrix.png").stat().st_size > 0


def _seven_class_map(path: pathlib.Path) -> str:
  names = list(synthetic.CLASS_NAMES) + ["water"]
  colours = list(synthetic.CLASS_COLOURS) + [(0, 0, 128)]
  path.write_text("name,r,g,b\n" + "".join(f"{n},{r},{g},{b}\n" for n, (r, g, b) in zip(names, colours)))
  return str(path)


@pytest.mark.slow
def test_evaluate_with_another_class_count_is_one_line_from_train_py(chain, tmp_path):
  data, _ = _dataset(tmp_path, num_scenes=1, split_fractions={"test": 1.0},
                     class_map=_seven_class_map(tmp_path / "seven.csv"))
  work = tmp_path / "work"
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/evaluate.py", f"--workdir={work}",
       f"--config.data.path={data}", f"--config.checkpoint={chain['finetune']}"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint: class count does not match: "), result.stderr[-2000:]
  assert f"({NUM_CLASSES},)" in last and f"({NUM_CLASSES + 1},)" in last
  assert not work.exists()


@pytest.mark.slow
def test_evaluate_a_4_band_model_on_3_band_data(chain, tmp_path, monkeypatch):
  data, _ = _dataset(tmp_path, num_scenes=1, split_fractions={"test": 1.0}, bands=3)

  def no_compute(*args, **kwargs):
    raise AssertionError("the band count must be checked before inference")

  monkeypatch.setattr(evaluate.inference, "sliding_window_logits", no_compute)
  work = tmp_path / "work"
  with pytest.raises(setup.ConfigError, match=r"^checkpoint: band count does not match: ") as error:
    evaluate.run(_evaluate_config(data, chain["finetune"]), str(work))
  assert "\n" not in str(error.value)
  assert ", 4, " in str(error.value) and ", 3, " in str(error.value)
  assert not work.exists()


@pytest.mark.slow
@pytest.mark.parametrize("key, value, message", [
    ("transfer", "backbone+decoder", r"^config key init.transfer is 'backbone\+decoder'; expected one of"),
    ("path", "/nonexistent/pretraining", r"^init.path: /nonexistent/pretraining: does not exist$"),
])
def test_finetune_bad_init_is_one_line_before_compute(chain, tmp_path, monkeypatch, key, value, message):
  def no_compute(*args, **kwargs):
    raise AssertionError("config.init must be checked before the model is initialised")

  monkeypatch.setattr(finetune.methods, "init_train_state", no_compute)
  config = _load_config("finetune", "checkpoint,tiny")
  config.data.path = str(chain["data"])
  config.data.label_fraction = None
  config.init.path = str(chain["finetune"])
  config.init[key] = value
  with pytest.raises(setup.ConfigError, match=message):
    finetune.run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()
