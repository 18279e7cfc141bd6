"""The synthetic corpus: determinism, georeference, class balance, label formats."""
import filecmp

import numpy as np
import pytest
import rasterio

from data_prep import synthetic


def test_same_seed_gives_byte_identical_files(tmp_path):
  a = synthetic.write_corpus(tmp_path / "a", num_scenes=2, height=200, width=160, seed=3)
  b = synthetic.write_corpus(tmp_path / "b", num_scenes=2, height=200, width=160, seed=3)
  c = synthetic.write_corpus(tmp_path / "c", num_scenes=1, height=200, width=160, seed=4)
  for (ia, la), (ib, lb) in zip(a, b):
    assert filecmp.cmp(ia, ib, shallow=False) and filecmp.cmp(la, lb, shallow=False)
  assert not filecmp.cmp(a[0][0], c[0][0], shallow=False)


def test_geotiffs_carry_crs_transform_and_shapes(tmp_path):
  pairs = synthetic.write_corpus(tmp_path / "c", num_scenes=2, height=96, width=128, seed=0,
                                 bands=5, dtype="uint16", gsd=0.5)
  origins = []
  for image_path, label_path in pairs:
    with rasterio.open(image_path) as img, rasterio.open(label_path) as lbl:
      assert img.crs.to_epsg() == 32633 and lbl.crs == img.crs
      assert img.transform == lbl.transform
      assert (img.transform.a, img.transform.e) == (0.5, -0.5)
      assert (img.count, img.height, img.width, img.dtypes[0]) == (5, 96, 128, "uint16")
      assert (lbl.count, lbl.dtypes[0]) == (1, "uint8")
      assert img.read().max() > 255  # uint16 uses its range, not a cast of 8-bit data
      assert set(np.unique(lbl.read())) <= set(range(6))
      origins.append(img.transform.c)
  assert origins[0] != origins[1]


def test_1024_scene_has_every_class_and_none_dominates():
  for seed in (0, 1):
    label = synthetic.render_scene(seed, 1024, 1024).label
    fractions = np.bincount(label.ravel(), minlength=6) / label.size
    print(f"seed {seed} class fractions:", dict(zip(synthetic.CLASS_NAMES, fractions.round(3))))
    assert (fractions > 0).all()
    assert fractions.max() <= 0.5


def test_scenes_differ_in_style():
  a = synthetic.render_scene(0, 256, 256).image
  b = synthetic.render_scene(1, 256, 256).image
  assert not np.allclose(a.reshape(-1, 4).mean(0), b.reshape(-1, 4).mean(0), atol=0.01)


def test_vegetation_is_bright_in_nir():
  scene = synthetic.render_scene(2, 512, 512)
  veg = np.isin(scene.label, (synthetic.TREE, synthetic.LOW_VEG))
  ndvi = (scene.image[..., 3] - scene.image[..., 0]) / (scene.image[..., 3] + scene.image[..., 0] + 1e-6)
  assert ndvi[veg].mean() > ndvi[~veg].mean() + 0.2


def test_colour_labels_use_isprs_colours(tmp_path):
  [(image_path, label_path)] = synthetic.write_corpus(tmp_path / "c", 1, 128, 128, seed=5,
                                                      colour_labels=True)
  expected = synthetic.render_scene(synthetic._scene_seed(5, 0), 128, 128).label
  with rasterio.open(label_path) as f:
    rgb = np.moveaxis(f.read(), 0, -1)
  assert rgb.shape == (128, 128, 3)
  np.testing.assert_array_equal(rgb, np.asarray(synthetic.CLASS_COLOURS, np.uint8)[expected])
  assert (tmp_path / "c" / "class_dict.csv").read_text().startswith("name,r,g,b\n")


def test_cli_refuses_existing_output_and_bad_arguments(tmp_path, capsys):
  (tmp_path / "taken").mkdir()
  assert synthetic.main(["--out", str(tmp_path / "taken")]) == 2
  assert "already exists" in capsys.readouterr().err
  assert synthetic.main(["--out", str(tmp_path / "x"), "--size", "10"]) == 2
  assert "too small" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_cli_bad_seed_names_it_and_preview_takes_any_band_count(tmp_path, capsys):
  assert synthetic.main(["--out", str(tmp_path / "x"), "--seed", "-1"]) == 2
  assert capsys.readouterr().err.strip() == "error: seed must be >= 0, got -1"
  assert not (tmp_path / "x").exists()
  # Refused before the progress bar starts, so the error is the only line.
  for flag, value, message in (("--bands", "0", "bands must be >= 1, got 0"),
                               ("--size", "32", "scene size 32x32 is too small: need at least 64x64")):
    assert synthetic.main(["--out", str(tmp_path / "x"), flag, value]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "x").exists()
  for bands in (1, 2):
    preview = tmp_path / f"p{bands}.png"
    assert synthetic.main(["--out", str(tmp_path / f"c{bands}"), "--scenes", "1", "--size", "64",
                           "--bands", str(bands), "--preview", str(preview)]) == 0
    assert preview.stat().st_size > 0
