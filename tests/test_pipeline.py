"""Grain pipelines end to end: pixel-id images, seeds, resume, sharding."""
import dataclasses
import glob
import json
import os
import subprocess
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
import pytest

from glc_jax.data import patches, pipelines, recipes

TILE, VIEW = 48, 32


def _id_source(n, tile=TILE):
  """Records whose bands are (row, col, record id, 0) of each pixel."""
  rows, cols = np.meshgrid(np.arange(tile), np.arange(tile), indexing="ij")
  return [{"image": np.stack([rows, cols, np.full_like(rows, i),
                              np.zeros_like(rows)], -1).astype(np.float32),
           "label": np.zeros((tile, tile), np.uint8)} for i in range(n)]


IDENTITY = {"mode": "stats", "mean": (0.0,) * 4, "std": (1.0,) * 4}
GEOMETRY_ONLY = {"colour": {"p": 0.0}, "gray_p": 0.0, "blur_p": 0.0,
                 "rot_p": 1.0}


def _glcnet_ids(crop=None, patch_size=8):
  config = {"tile_crop": 40, "view_size": VIEW, "patch_size": patch_size,
            "patch_num": 3, "norm": IDENTITY, "view2": GEOMETRY_ONLY,
            "value_max": 1e6}
  if crop:
    config["crop"] = crop
  return pipelines.recipe_for("glcnet", config)


def _unturn(patch, geo_flip_k):
  """Inverse of the view-2 orientation, from the oracle's point map."""
  n = patch.shape[0]
  ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  ty, tx = patches.orient_points(ys, xs, n, *geo_flip_k)
  return patch[ty, tx]


def _find_orientation(view2_patch, view1_patch):
  """The flip/k under which the view-2 patch best lines up with view 1."""
  errs = {}
  for flip in range(4):
    for k in range(4):
      errs[(flip, k)] = np.abs(_unturn(view2_patch, (flip, k))
                               - view1_patch).max()
  return min(errs, key=errs.get)


@pytest.mark.parametrize("crop,tol_scale", [
    ({"scale": (0.5, 0.5), "ratio": (1.0, 1.0), "swap_p": 0.0}, False),
    (None, True)])
def test_pixel_ids_through_pipeline(crop, tol_scale):
  ds = pipelines.train_dataset(_id_source(6), _glcnet_ids(crop), batch_size=3,
                               seed=0, process_index=0, process_count=1)
  it = pipelines.make_iterator(ds)
  checked = 0
  for _ in range(6):
    batch = next(it)
    for b in range(3):
      v1, v2 = batch["view1"][b], batch["view2"][b]
      boxes1, boxes2 = batch["patch_boxes1"][b], batch["patch_boxes2"][b]
      valid = batch["patch_valid"][b]
      for p in np.flatnonzero(valid):
        y0, x0, y1, x1 = boxes1[p]
        q0, r0, q1, r1 = boxes2[p]
        assert 0 <= min(y0, x0, q0, r0) and max(y1, x1, q1, r1) <= VIEW
        half = (y1 - y0) // 2
        c1 = v1[y0 + half, x0 + half, :2]
        p1 = v1[y0:y1, x0:x1, :2]
        p2 = v2[q0:q1, r0:r1, :2]
        turn = _find_orientation(p2, p1)
        p2u = _unturn(p2, turn)
        # Bilinear ids sit within half a pixel of the source pixel that the
        # nearest-pixel geometry assigns: the centres round to the same one.
        assert np.all(np.abs(c1 - np.round(c1)) <= 0.5 + 1e-4)
        assert np.array_equal(np.floor(c1 + 0.5), np.floor(p2u[half, half] + 0.5))
        # Every patch pixel: the same source pixel up to rounding (< 1 id),
        # plus, when the two crops' scales differ, the drift of the scale
        # difference times the distance from the centre, per axis.
        off = np.abs(np.arange(y1 - y0) - half)
        step = lambda a, axis: np.median(np.diff(a, axis=axis))
        drift_y = off[:, None] * abs(step(p1[..., 0], 0) - step(p2u[..., 0], 0))
        drift_x = off[None, :] * abs(step(p1[..., 1], 1) - step(p2u[..., 1], 1))
        if not tol_scale:
          drift_y = drift_x = 0.0
        assert np.all(np.abs(p1[..., 0] - p2u[..., 0]) < 1.0 + drift_y + 1e-3)
        assert np.all(np.abs(p1[..., 1] - p2u[..., 1]) < 1.0 + drift_x + 1e-3)
        checked += 1
      # View-1 patches do not overlap.
      occupancy = np.zeros((VIEW, VIEW), int)
      for y0, x0, y1, x1 in boxes1[valid]:
        occupancy[y0:y1, x0:x1] += 1
      assert occupancy.max() <= 1
  assert checked > 30


def _batches(ds, n, **kwargs):
  it = pipelines.make_iterator(ds, **kwargs)
  return [next(it) for _ in range(n)]


def _equal(a, b):
  return all(np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
             for x, y in zip(a, b) for k in x)


def test_seeds_reproduce_and_differ():
  src = _id_source(8)
  make = lambda seed: pipelines.train_dataset(
      src, _glcnet_ids(), batch_size=4, seed=seed, process_index=0,
      process_count=1)
  assert _equal(_batches(make(3), 3), _batches(make(3), 3))
  assert not _equal(_batches(make(3), 3), _batches(make(4), 3))


def test_epochs_reshuffle_and_cover():
  src = _id_source(8)
  fn = lambda record, rng: {"id": record["image"][0, 0, 2]}
  ds = pipelines.train_dataset(src, fn, batch_size=4, seed=0, num_epochs=2,
                               process_index=0, process_count=1)
  ids = [b["id"] for b in ds]
  epoch1, epoch2 = np.concatenate(ids[:2]), np.concatenate(ids[2:])
  assert sorted(epoch1) == sorted(epoch2) == list(range(8))
  assert not np.array_equal(epoch1, epoch2)


def test_restore_continues_identically_through_device_prefetch(devices):
  src = _id_source(24)
  ds = pipelines.train_dataset(src, _glcnet_ids(), batch_size=8, seed=1,
                               process_index=0, process_count=1)
  mesh = jax.make_mesh((8,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  it = pipelines.make_iterator(ds, sharding=sharding)
  for _ in range(2):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  assert expected[0]["view1"].sharding == sharding
  fresh = pipelines.make_iterator(ds, sharding=sharding)
  fresh.set_state(json.loads(json.dumps(state)))
  assert _equal([next(fresh) for _ in range(3)], expected)


def test_orbax_handler_round_trip(tmp_path):
  ds = pipelines.train_dataset(_id_source(8), _glcnet_ids(), batch_size=2,
                               seed=5, process_index=0, process_count=1)
  it = pipelines.make_iterator(ds)
  next(it)
  grain.checkpoint.CheckpointHandler().save(
      tmp_path, args=grain.checkpoint.CheckpointSave(it))
  expected = [next(it) for _ in range(2)]
  fresh = grain.checkpoint.CheckpointHandler().restore(
      tmp_path, args=grain.checkpoint.CheckpointRestore(
          pipelines.make_iterator(ds)))
  assert _equal([next(fresh) for _ in range(2)], expected)


def test_processes_get_disjoint_shards_covering_the_epoch():
  src = _id_source(12)
  fn = lambda record, rng: {"id": record["image"][0, 0, 2]}
  seen = []
  for index in range(2):
    ds = pipelines.train_dataset(src, fn, batch_size=2, seed=0, num_epochs=1,
                                 process_index=index, process_count=2)
    seen.append(set(np.concatenate([b["id"] for b in ds]).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(12))


def test_eval_dataset_pads_and_covers_every_record_once():
  src = _id_source(7, tile=8)
  seen = []
  lengths = set()
  for index in range(3):
    ds = pipelines.eval_dataset(src, batch_size=2, config={"norm": IDENTITY},
                                process_index=index, process_count=3)
    lengths.add(len(ds))
    for batch in ds:
      assert batch["image"].shape == (2, 8, 8, 4)
      assert batch["label"].dtype == np.int32
      seen += batch["image"][batch["valid"], 0, 0, 2].tolist()
  assert len(lengths) == 1
  assert sorted(seen) == list(range(7))


def test_method_recipes_follow_the_batch_contract():
  rng = np.random.default_rng(0)
  rec = {"image": rng.integers(0, 256, (64, 64, 4), dtype=np.uint8),
         "label": rng.integers(0, 6, (64, 64)).astype(np.uint8)}
  src = [rec] * 4
  perms = np.array([np.roll(np.arange(9), i) for i in range(5)])
  cases = {
      "simclr": ({"tile_crop": 64, "view_size": 32},
                 {"view1": (32, 32, 4), "view2": (32, 32, 4)}),
      "inpainting": ({"view_size": 32, "blocks": 3, "block_size": 8},
                     {"image": (32, 32, 4), "mask": (32, 32)}),
      "jigsaw": ({"tile_size": 16, "tile_crop": 12,
                  "augment": {"crop_size": 48}},
                 {"tiles": (9, 16, 16, 4), "perm_index": ()}),
      "finetune": ({"crop_size": 32}, {"image": (32, 32, 4),
                                       "label": (32, 32)}),
  }
  for method, (config, shapes) in cases.items():
    fn = pipelines.recipe_for(method, config, permutations=perms)
    batch = next(iter(pipelines.train_dataset(
        src, fn, batch_size=2, seed=0, process_index=0, process_count=1)))
    assert {k: v.shape[1:] for k, v in batch.items()} == shapes, method
    for key in ("view1", "view2", "image", "tiles"):
      if key in batch:
        assert batch[key].dtype == np.float32
        assert -1.6 - 1e-5 <= batch[key].min() and batch[key].max() <= 1.6 + 1e-5
  with pytest.raises(ValueError, match="unknown input method"):
    pipelines.recipe_for("byol")


def test_finetune_label_follows_image_and_ignores_outside():
  # Label = class of the image's band 0 (3 stripes); the warp's outside
  # pixels are black in the image and 255 in the label.
  img = np.zeros((32, 32, 3), np.uint8)
  lbl = np.zeros((32, 32), np.uint8)
  for c in range(3):
    img[:, c * 11:(c + 1) * 11, 0] = 60 + 60 * c
    lbl[:, c * 11:(c + 1) * 11] = c
  cfg = {"crop_size": 32, "warp": {"p": 1.0}, "hsv_p": 0.0,
         "noise_p": 0.0, "norm": {"mode": "stats", "mean": (0.0,) * 3,
                                  "std": (1.0,) * 3}}
  fn = pipelines.recipe_for("finetune", cfg)
  for seed in range(5):
    out = fn({"image": img, "label": lbl}, np.random.default_rng(seed))
    band0, label = out["image"][..., 0], out["label"]
    inside = label != 255
    # Away from stripe edges (where bilinear mixes), band 0 encodes the label.
    exact = np.isin(band0, [60.0, 120.0, 180.0])
    assert np.all((band0[inside & exact] - 60) / 60 == label[inside & exact])
    # Outside pixels sample at least half a pixel beyond the edge, so at
    # most half of the edge value survives the zero padding.
    assert np.all(band0[~inside] <= 0.5 * 180 + 1e-3)


@pytest.mark.slow
def test_worker_processes_do_not_change_the_stream():
  ds = pipelines.train_dataset(_id_source(12), _glcnet_ids(), batch_size=2,
                               seed=9, process_index=0, process_count=1)
  inline = _batches(ds, 5)
  it = pipelines.make_iterator(ds, num_workers=2)
  try:
    assert _equal([next(it) for _ in range(5)], inline)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
  finally:
    it.close()
  fresh = pipelines.make_iterator(ds, num_workers=2)
  try:
    fresh.set_state(state)
    assert _equal([next(fresh) for _ in range(2)], expected)
  finally:
    fresh.close()


@pytest.mark.slow
def test_pipelines_over_a_data_prep_dataset(tmp_path):
  rasterio = pytest.importorskip("rasterio")
  from data_prep.convert import convert  # pylint: disable=g-import-not-at-top
  from glc_jax.data.source import open_dataset  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (4, 64, 64), dtype=np.uint8)
  label = rng.integers(0, 5, (1, 64, 64), dtype=np.uint8)
  transform = rasterio.transform.Affine(0.5, 0, 3e5, 0, -0.5, 5.8e6)
  for name, array in (("x.tif", image), ("x_lbl.tif", label)):
    with rasterio.open(tmp_path / name, "w", driver="GTiff", height=64,
                       width=64, count=array.shape[0], dtype="uint8",
                       crs="EPSG:32632", transform=transform) as f:
      f.write(array)
  out = convert(str(tmp_path / "x.tif"), tmp_path / "ds",
                labels=str(tmp_path / "x_lbl.tif"), tile=32,
                label_stem_replace=("x", "x_lbl"), workers=0, progress=False)
  source, info = open_dataset(out, "train")
  data = pipelines.dataset_data_config(info, "stats")
  tiles = np.stack([source[i]["image"] for i in range(len(source))])
  np.testing.assert_allclose(data["norm"]["mean"],
                             tiles.reshape(-1, 4).mean(0), rtol=1e-6)
  fn = pipelines.recipe_for("glcnet", {"tile_crop": 32, "view_size": 24,
                                       "patch_size": 8, **data})
  batch = next(iter(pipelines.train_dataset(source, fn, batch_size=2, seed=0,
                                            process_index=0,
                                            process_count=1)))
  assert batch["view1"].shape == (2, 24, 24, 4)
  assert batch["patch_valid"].any()
  evals = list(pipelines.eval_dataset(source, batch_size=4,
                                      config={"norm": data["norm"]},
                                      process_index=0, process_count=1))
  got = np.concatenate([b["image"][b["valid"]] for b in evals])
  mean = np.array(data["norm"]["mean"], np.float32)
  std = np.array(data["norm"]["std"], np.float32)
  np.testing.assert_allclose(got, (tiles - mean) / std, rtol=1e-5, atol=1e-5)


_STATS = {"norm": {"mode": "stats", "mean": (10.0,) * 4, "std": (2.0,) * 4},
          "value_max": 1000.0}
_NO_FINETUNE_AUG = {"flip_probs": (1.0, 0.0, 0.0, 0.0), "rot_p": 0.0, "warp": {"p": 0.0},
                    "hsv_p": 0.0, "band_jitter": 0.0, "noise_p": 0.0}


@pytest.mark.parametrize("method", sorted(pipelines.RECIPE_CONFIGS))
def test_dataset_keys_reach_every_recipe(method):
  """Every method's recipe accepts what the stages derive from the dataset,
  and normalises with it: a constant 12 becomes (12 - 10) / 2 = 1 everywhere."""
  config = {"finetune": {"crop_size": 24, **_NO_FINETUNE_AUG},
            "jigsaw": {"tile_size": 8, "tile_crop": 8,
                       "augment": {"crop_size": 24, **_NO_FINETUNE_AUG}},
            "inpainting": {"tile_crop": 24, "view_size": 16}}.get(
                method, {"tile_crop": 24, "view_size": 16, "patch_size": 4,
                         "view2": {"colour": {"p": 0.0}, "blur_p": 0.0, "gray_p": 0.0}})
  # As the stages pass it: a ConfigDict, whose nested dicts are no Mappings.
  fn = pipelines.recipe_for(method, ml_collections.ConfigDict(config), dataset=_STATS)
  record = {"image": np.full((24, 24, 4), 12, np.uint16),
            "label": np.zeros((24, 24), np.uint8)}
  out = fn(record, np.random.default_rng(0))
  image = out.get("view2", out.get("tiles", out.get("image")))
  np.testing.assert_allclose(image, 1.0, atol=1e-6)
  cfg = fn.keywords["cfg"]
  colour_cfg = cfg.augment if method == "jigsaw" else cfg
  if hasattr(colour_cfg, "value_max"):
    assert colour_cfg.value_max == 1000.0


def test_config_keys_win_over_dataset_keys():
  fn = pipelines.recipe_for("inpainting", {"tile_crop": 24, "view_size": 16,
                                           "norm": {"mode": "reference"}}, dataset=_STATS)
  out = fn({"image": np.full((24, 24, 4), 255, np.uint8)}, np.random.default_rng(0))
  np.testing.assert_allclose(out["image"], 1.6, atol=1e-6)


def test_nested_overrides_keep_the_nested_defaults():
  jigsaw = recipes.config_from_dict(recipes.JigsawConfig, {"augment": {"hsv_p": 0.0}})
  assert (jigsaw.augment.crop_size, jigsaw.augment.hsv_p) == (
      recipes.JigsawConfig().augment.crop_size, 0.0)
  two = recipes.config_from_dict(recipes.TwoViewConfig, {"view1": {"gray_p": 0.3}})
  assert two.view1 == dataclasses.replace(recipes.NO_VIEW_AUG, gray_p=0.3)


def test_inpainting_mask_is_a_union_of_blocks():
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  fn = pipelines.recipe_for("inpainting", {"view_size": 40, "blocks": 5,
                                           "block_size": 6})
  rec = {"image": np.zeros((48, 48, 3), np.uint8)}
  for seed in range(10):
    mask = fn(rec, np.random.default_rng(seed))["mask"]
    assert 36 <= mask.sum() <= 5 * 36
    opened = ndimage.binary_opening(mask, structure=np.ones((6, 6)))
    assert np.array_equal(opened, mask)


def test_jigsaw_tiles_follow_the_permutation():
  g, t = 3, 8
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (g * t, g * t, 3), dtype=np.uint8)
  perms = np.array([rng.permutation(9) for _ in range(7)])
  no_aug = {"crop_size": g * t, "flip_probs": (1.0, 0.0, 0.0, 0.0),
            "rot_p": 0.0, "warp": {"p": 0.0}, "hsv_p": 0.0,
            "band_jitter": 0.0, "noise_p": 0.0}
  fn = pipelines.recipe_for("jigsaw", {"grid": g, "tile_size": t,
                                       "tile_crop": t, "augment": no_aug},
                            permutations=perms)
  out = fn({"image": image}, np.random.default_rng(1))
  norm = image.astype(np.float32) / 255 * 3.2 - 1.6
  cells = [norm[r * t:(r + 1) * t, c * t:(c + 1) * t]
           for r in range(g) for c in range(g)]
  order = perms[out["perm_index"]]
  for i in range(9):
    np.testing.assert_allclose(out["tiles"][i], cells[order[i]], atol=1e-5)


# A parent that starts 2 Grain workers. "running": killed once a batch came
# back. "starting": killed while its workers are still starting; each sleeps
# first in the spawn import of this script, as train.py's workers spend
# seconds importing it (the pipeline is small, so it is already in the pipe).
_KILLED_PARENT = """
import sys, threading, time
if __name__ == "__mp_main__" and {moment!r} == "starting":
  time.sleep(3)
sys.path.insert(0, {tests!r})
if __name__ == "__main__":
  import grain
  from glc_jax.data import pipelines
  if {moment!r} == "running":
    from test_pipeline import _glcnet_ids, _id_source
    ds = pipelines.train_dataset(_id_source(12), _glcnet_ids(), batch_size=2, seed=9,
                                 process_index=0, process_count=1)
  else:
    ds = grain.MapDataset.range(64).batch(2)
  it = pipelines.make_iterator(ds, num_workers=2)
  if {moment!r} == "running":
    next(it)
  else:
    threading.Thread(target=next, args=(it,), daemon=True).start()
  print("ready", flush=True)
  time.sleep(600)
"""


def _children(pid):
  out = []
  for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
      fields = open(stat).read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      out.append(int(stat.split("/")[2]))
  return out


def _workers(pid):
  """The Grain worker processes among `pid`'s children (not the resource tracker)."""
  found = []
  for child in _children(pid):
    try:
      if b"spawn_main" in open(f"/proc/{child}/cmdline", "rb").read():
        found.append(child)
    except OSError:
      pass
  return found


def _running(pid):
  try:
    return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("moment", ["running", "starting"])
def test_workers_exit_when_the_parent_is_killed(tmp_path, moment):
  script = tmp_path / "parent.py"
  script.write_text(_KILLED_PARENT.format(tests=os.path.dirname(__file__), moment=moment))
  parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
  try:
    assert parent.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while len(_workers(parent.pid)) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    workers = _workers(parent.pid)
    assert len(workers) == 2, f"{len(workers)} worker processes found, expected 2"
    if moment == "starting":
      time.sleep(0.5)  # the parent has written the workers' pipeline; they still sleep
  finally:
    parent.kill()
    parent.wait()
  deadline = time.monotonic() + 20
  alive = workers
  while alive and time.monotonic() < deadline:
    time.sleep(0.2)
    alive = [w for w in alive if _running(w)]
  assert not alive, f"worker processes {alive} outlived their killed parent"
