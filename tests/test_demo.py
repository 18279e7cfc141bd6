"""The demo (the README's main job) on a tiny configuration: it prints each
step's wall time and lists every output it made, and the outputs exist.

The configuration is shrunk exactly as tests/test_config_variants.py shrinks it,
so the programs compiled by either test are served to the other by the session's
persistent compilation cache.
"""
import pathlib
import re

import numpy as np
import pytest
import rasterio
from matplotlib import image as mpimg

from data_prep import synthetic
import test_config_variants as variants  # pylint: disable=wrong-import-order

import train  # noqa: E402  (test_config_variants puts the repository root on sys.path)


def _tiny_demo():
  _, config = variants._config("demo")  # pylint: disable=protected-access
  stage = {**variants.MODEL, "data.batch_size": 8, "data.num_workers": 0}
  return variants._override(config, {  # pylint: disable=protected-access
      "synthetic.num_scenes": 5, "synthetic.size": 2 * variants.TILE, "prep.tile": variants.TILE,
      "prep.split_fractions": "train=0.6,val=0.2,test=0.2", "prep.label_fraction": 1.0,
      **{f"pretrain.{k}": v for k, v in variants._pretrain_overrides("glcnet").items()},  # pylint: disable=protected-access
      **{f"finetune.{k}": v for k, v in {**stage, **variants.FINETUNE}.items()
         if k != "data.label_fraction"},
      **{f"evaluate.{k}": v for k, v in variants.EVALUATE.items()}})


@pytest.mark.slow
def test_demo_lists_what_it_made_and_times_its_steps(tmp_path, capsys):
  work = tmp_path / "demo"
  train.run_stage(_tiny_demo(), str(work))
  out = capsys.readouterr().out

  for step in ("[1/5] synthetic corpus", "[2/5] ArrayRecord dataset", "[3/5] GLCNet pretraining",
               "[4/5] fine-tuning", "[5/5] evaluation"):
    assert re.search(rf"^  {re.escape(step)} +(\d+m)?\d+s", out, re.M), f"no time for {step!r}"
  assert re.search(r"^  total +(\d+m)?\d+s$", out, re.M)

  listed = out[out.index("What the demo made:"):]
  expected = [work / "results.json"]
  for init in ("glcnet", "random"):
    expected += [work / f"eval_{init}" / "metrics.json", work / f"eval_{init}" / "confusion_matrix.png",
                 work / f"preview_{init}.png"]
    # One test scene (5 scenes at test=0.2), written as class indices and as colours.
    expected += [work / f"eval_{init}" / "predictions" / f"{name}.tif"
                 for name in ("scene_001_class", "scene_001_colour")]
  for path in expected:
    assert path.is_file(), path
    assert f"    {path}\n" in listed or f" {path}\n" in listed, f"{path} not listed"
  assert f"tensorboard --logdir {work}" in listed
  assert list((work / "pretrain_glcnet" / "tb").glob("events.out.tfevents.*"))

  # The preview shows the true and the predicted labels in the ISPRS colours at one
  # scale: each class's colour covers a share of the picture proportional to its
  # pixels in the corpus's label raster plus the prediction GeoTIFF (the legend
  # adds a small constant; white, the background, is left out).
  with rasterio.open(work / "synthetic" / "labels" / "scene_001.tif") as raster:
    truth = np.bincount(raster.read(1).ravel(), minlength=6)
  with rasterio.open(work / "eval_glcnet" / "predictions" / "scene_001_class.tif") as raster:
    predicted = np.bincount(raster.read(1).ravel(), minlength=6)
  picture = (mpimg.imread(work / "preview_glcnet.png")[..., :3] * 255).round().astype(np.uint8)
  shown = {k: int(np.all(picture == synthetic.CLASS_COLOURS[k], axis=-1).sum()) for k in range(1, 6)}
  ratios = {k: shown[k] / (truth[k] + predicted[k]) for k in shown if truth[k] + predicted[k] >= 500}
  assert len(ratios) >= 3, (truth, predicted)
  middle = np.median(list(ratios.values()))
  assert middle > 1, ratios  # each scene pixel is several picture pixels
  for k, ratio in ratios.items():
    assert 0.85 * middle < ratio < 1.15 * middle, (synthetic.CLASS_NAMES[k], ratios)


def test_demo_without_predictions_writes_no_preview_and_says_why(tmp_path):
  """evaluate.write_predictions=false: nothing to draw, and the list says so."""
  # pylint: disable=import-outside-toplevel,protected-access
  from data_prep import convert
  from glc_jax.stages import demo
  corpus = tmp_path / "synthetic"
  synthetic.write_corpus(corpus, num_scenes=3, height=64, width=64, seed=0, bands=4)
  dataset = convert.convert(str(corpus / "images"), tmp_path / "dataset", str(corpus / "labels"),
                            class_map=str(corpus / "class_dict.csv"), tile=32,
                            split_fractions={"train": 0.34, "val": 0.33, "test": 0.33},
                            workers=0, progress=False)
  for init in ("glcnet", "random"):
    (tmp_path / f"eval_{init}" / "predictions").mkdir(parents=True)
  assert demo._write_previews(tmp_path, str(dataset), "test") == {}
  assert not list(tmp_path.glob("preview_*.png"))
  listed = demo._outputs(tmp_path, {})
  assert listed.count("none: evaluate.write_predictions is off") == 2  # previews and GeoTIFFs
