"""The `reference` protocol's switches, each against an independent oracle."""
import json

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import rasterio
from jax.sharding import NamedSharding, PartitionSpec as P

from glc_jax import checkpoint, losses, models
from glc_jax.data import patches, pipelines
from glc_jax.parallel import DATA_AXIS, make_data_mesh
from glc_jax.stages import loop


def _identity_jigsaw(g, t, **keys):
  no_aug = {"crop_size": g * t, "flip_probs": (1.0, 0.0, 0.0, 0.0), "rot_p": 0.0,
            "warp": {"p": 0.0}, "hsv_p": 0.0, "band_jitter": 0.0, "noise_p": 0.0}
  return pipelines.recipe_for("jigsaw", dict(grid=g, tile_size=t, tile_crop=t,
                                             augment=no_aug, **keys))


@pytest.mark.parametrize("first", [0, 1])
def test_jigsaw_permutations_load_from_npy_path(tmp_path, first):
  g, t = 3, 4
  rng = np.random.default_rng(0)
  perms = np.array([rng.permutation(9) for _ in range(5)])
  path = tmp_path / "perms.npy"
  np.save(path, perms + first)  # the reference's loader also accepts 1-based files
  fn = _identity_jigsaw(g, t, permutations=str(path))
  image = rng.integers(0, 256, (g * t, g * t, 3), dtype=np.uint8)
  norm = image.astype(np.float32) / 255 * 3.2 - 1.6
  cells = [norm[r * t:(r + 1) * t, c * t:(c + 1) * t] for r in range(g) for c in range(g)]
  seen = set()
  for seed in range(12):
    out = fn({"image": image}, np.random.default_rng(seed))
    k = int(out["perm_index"])
    seen.add(k)
    for i in range(9):
      np.testing.assert_allclose(out["tiles"][i], cells[perms[k][i]], atol=1e-5)
  assert seen <= set(range(5)) and len(seen) > 1


def test_jigsaw_permutation_set_checks_file_and_count(tmp_path):
  good = tmp_path / "good.npy"
  np.save(good, np.array([np.arange(9), np.arange(9)[::-1]]))
  assert pipelines.jigsaw_permutation_set(str(good), 2).shape == (2, 9)
  with pytest.raises(ValueError, match="good.npy holds 2 permutations but model.num_permutations = 1000"):
    pipelines.jigsaw_permutation_set(str(good), 1000)
  bad = tmp_path / "bad.npy"
  np.save(bad, np.array([[0, 0, 2, 3, 4, 5, 6, 7, 8]]))
  with pytest.raises(ValueError, match="bad.npy: row 0"):
    pipelines.jigsaw_permutation_set(str(bad), 1)
  with pytest.raises(ValueError, match="missing.npy"):
    pipelines.jigsaw_permutation_set(str(tmp_path / "missing.npy"), 1)
  np.save(bad, np.zeros((3, 4), np.int64))
  with pytest.raises(ValueError, match=r"expected an \(N, 9\) integer array"):
    pipelines.jigsaw_permutation_set(str(bad), 3)
  assert pipelines.jigsaw_permutation_set("", 7).shape == (7, 9)


def _id_view(ids, geo):
  """The reference's route to correspondence: its pixel-id map pushed through the
  view's crop, nearest resize (sample point floor((i + 0.5) * h / n)), flip, rotation."""
  y0, x0, h, w = geo.box
  i = np.arange(geo.size)
  view = ids[(y0 + (2 * i + 1) * h // (2 * geo.size))[:, None],
             (x0 + (2 * i + 1) * w // (2 * geo.size))[None, :]]
  if geo.flip & 1:
    view = view[:, ::-1]
  if geo.flip & 2:
    view = view[::-1]
  return np.rot90(view, -geo.k)


def _reference_rule(rng, label1, label2, p, num, width):
  """A numpy re-statement of the reference's patch rule (T-SS-GLCNet get_index).

  Candidates: ids present in both views at centres [p//2, n - p//2). Each patch
  takes one uniformly (index into the sorted ids), placed at its first view-1
  position, in raster order, whose patch fits; then the ids under that patch's
  [c - p//2, c + p//2) window leave, unless at most one id would remain.
  """
  n, h = label1.shape[0], p // 2
  live = sorted(set(label1[h:n - h, h:n - h].ravel()) & set(label2[h:n - h, h:n - h].ravel()))
  centres, boxes, fallbacks = [], [], 0
  for _ in range(num):
    pick = live[rng.integers(0, len(live))]
    r, c = next((r, c) for r, c in np.argwhere(label1 == pick)
                if r - h >= 0 and r + h <= n and c - h >= 0 and c + h <= n)
    centres.append(divmod(pick, width))
    boxes.append((r - h, c - h, r - h + p, c - h + p))
    rest = sorted(set(live) - set(label1[r - h:r + h, c - h:c + h].ravel()))
    if len(rest) > 1:
      live = rest
    else:
      fallbacks += 1
  return np.array(centres), np.array(boxes), fallbacks


def _overlaps(boxes):
  return sum(max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1])) > 0
             for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_reference_patch_rule_matches_numpy_restatement():
  src = 40
  ids = np.arange(src * src).reshape(src, src)
  layout = np.random.default_rng(7)
  fallbacks = overlapping = 0
  for case in range(60):
    n = int(layout.choice([8, 16, 24]))
    p = int(layout.choice([2, 3, 4, 6, 8]))
    num = int(layout.integers(1, 7))
    geos = []
    for view in range(2):  # view 1 is only cropped, as in the recipe
      h, w = (int(v) for v in layout.integers(4, src // 2 + 1, 2))
      geos.append(patches.ViewGeometry(
          (int(layout.integers(0, src - h + 1)), int(layout.integers(0, src - w + 1)), h, w),
          n, *(layout.integers(0, 4, 2) * view).tolist()))
    label1, label2 = _id_view(ids, geos[0]), _id_view(ids, geos[1])
    h = p // 2
    shared = set(label1[h:n - h, h:n - h].ravel()) & set(label2[h:n - h, h:n - h].ravel())
    boxes1, boxes2, centres, valid = patches.sample_matched_patches(
        np.random.default_rng(case), *geos, p, num, overlap="reference")
    if not shared:
      assert not valid.any()
      continue
    want_centres, want_boxes, fell_back = _reference_rule(
        np.random.default_rng(case), label1, label2, p, num, src)
    assert valid.all()
    np.testing.assert_array_equal(centres, want_centres, err_msg=f"case {case}")
    np.testing.assert_array_equal(boxes1, want_boxes, err_msg=f"case {case}")
    for (r, c), (y0, x0, y1, x1) in zip(centres, boxes2):
      assert r * src + c in label2[y0:y1, x0:x1]
    fallbacks += fell_back
    overlapping += _overlaps(want_boxes) > 0
  assert fallbacks and overlapping  # both parts of the rule were exercised


def test_reference_patch_overlap_key_is_checked():
  with pytest.raises(ValueError, match="input.patch_overlap = 'centres'"):
    pipelines.recipe_for("glcnet", {"patch_overlap": "centres"})


def test_moco_per_device_queues_equal_independent_single_device_runs(devices):
  """N devices with per-device queues = N separate one-device MoCo runs: each
  device's loss term and gradient use its own queue, which takes its keys only."""
  n_dev, n, size, dim, steps = 4, 2, 4, 3, 3
  mesh = make_data_mesh(devices[:n_dev])
  rng = np.random.default_rng(11)
  queues = rng.normal(size=(n_dev, size, dim)).astype(np.float32)
  queues /= np.linalg.norm(queues, axis=-1, keepdims=True)

  def step(q, k, queues, ptr):
    def loss_fn(q):
      return losses.moco_infonce_loss(q, k, losses.own_queue(queues, DATA_AXIS),
                                      temperature=0.2, axis_name=DATA_AXIS)
    loss, grad = jax.value_and_grad(loss_fn)(q)
    return (loss, grad) + losses.enqueue_keys(queues, ptr, k, axis_name=DATA_AXIS)
  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                                  out_specs=(P(), P(DATA_AXIS), P(), P())))

  def single(q, k, queue, ptr):
    loss, grad = jax.value_and_grad(
        lambda q: losses.moco_infonce_loss(q, k, queue, temperature=0.2))(q)
    return (loss, grad) + losses.enqueue_keys(queue, ptr, k)

  alone = [(queues[d], np.int32(0)) for d in range(n_dev)]
  ptr = np.int32(0)
  for _ in range(steps):
    q = rng.normal(size=(n_dev * n, dim)).astype(np.float32)
    k = rng.normal(size=(n_dev * n, dim)).astype(np.float32)
    split = NamedSharding(mesh, P(DATA_AXIS))
    loss, grad, queues, ptr = sharded(jax.device_put(q, split), jax.device_put(k, split),
                                      *jax.device_put((queues, ptr), NamedSharding(mesh, P())))
    runs = [single(q[d * n:(d + 1) * n], k[d * n:(d + 1) * n], *alone[d]) for d in range(n_dev)]
    alone = [(r[2], r[3]) for r in runs]
    np.testing.assert_allclose(loss, np.mean([r[0] for r in runs]), rtol=1e-6)
    np.testing.assert_allclose(grad, np.concatenate([r[1] for r in runs]) / n_dev, rtol=1e-5,
                               atol=1e-7)
    for d in range(n_dev):
      np.testing.assert_allclose(queues[d], alone[d][0], rtol=1e-6)
      assert int(ptr) == int(alone[d][1])


@pytest.mark.slow
def test_stem_init_reference_is_torch_default_for_other_band_counts():
  """torch's Conv2d default, kaiming_uniform(a=sqrt(5)), is U(±1/sqrt(fan_in)) with
  fan_in = bands·7·7; the reference leaves it on the first conv it replaces when
  bands != 3 and keeps kaiming-normal for 3 bands."""
  model = models.ResNet(depth=18, width=0.125, stem_init="reference")
  for bands in (3, 4):
    x = np.zeros((1, 32, 32, bands), np.float32)
    w = np.asarray(model.init(jax.random.key(0), x, train=False)["params"]["conv1"]["kernel"])
    bound = 1 / np.sqrt(7 * 7 * bands)
    if bands == 3:
      assert abs(w.std() / np.sqrt(2 / (7 * 7 * bands)) - 1) < 0.1
    else:
      assert bound >= np.abs(w).max() > 0.95 * bound
      assert abs(w.std() / (bound / np.sqrt(3)) - 1) < 0.1
  with pytest.raises(ValueError, match="stem_init"):
    jax.eval_shape(lambda key: models.ResNet(depth=18, stem_init="torch").init(key, x, train=False),
                   jax.random.key(0))


def test_inpainting_epoch_masks_are_shared_by_every_batch_of_an_epoch():
  """masks="epoch": the reference draws batch-size masks at each epoch's start
  and erases slot i of every batch with mask i; corners in 0..n-b-2."""
  n, b, blocks, batch, records = 16, 4, 3, 2, 7
  config = {"view_size": n, "block_size": b, "blocks": blocks, "tile_crop": 16, "masks": "epoch"}
  source = [{"image": np.full((16, 16, 3), i, np.uint8)} for i in range(records)]
  ds = pipelines.train_dataset(source, pipelines.recipe_for("inpainting", config),
                               batch_size=batch, seed=3, process_index=0, process_count=1,
                               epoch_arrays=pipelines.epoch_arrays_for("inpainting", config))
  by_epoch = {}
  for i in range(10):  # epochs of 7 records: batch i starts in epoch 2i // 7
    by_epoch.setdefault(2 * i // records, []).append(ds[i]["mask"])
  for masks in by_epoch.values():
    for m in masks[1:]:
      np.testing.assert_array_equal(m, masks[0])
    assert masks[0].shape == (batch, n, n) and not np.array_equal(masks[0][0], masks[0][1])
    assert not masks[0][:, n - 2:].any() and not masks[0][:, :, n - 2:].any()
    assert all(b * b <= m.sum() <= blocks * b * b for m in masks[0])
  assert not np.array_equal(by_epoch[0][0], by_epoch[1][0])
  np.testing.assert_array_equal(ds[0]["mask"], by_epoch[0][0])  # random access, same masks
  ours = pipelines.train_dataset(source, pipelines.recipe_for("inpainting", dict(config, masks="example")),
                                 batch_size=batch, seed=3, process_index=0, process_count=1)
  assert not np.array_equal(ours[0]["mask"], ours[1]["mask"])
  assert pipelines.epoch_arrays_for("inpainting", dict(config, masks="example")) is None
  with pytest.raises(ValueError, match="input.masks = 'batch'"):
    pipelines.recipe_for("inpainting", dict(config, masks="batch"))


def _bilinear_fill0(label, ys, xs):
  """Bilinear sampling of `label` at (ys[i], xs[j]), pixel centres at integers,
  taps outside the image reading 0 (cv2.warpPerspective, BORDER_CONSTANT)."""
  h, w = label.shape
  out = np.zeros((len(ys), len(xs)))
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
          if 0 <= yy < h and 0 <= xx < w:
            out[i, j] += wy * wx * label[yy, xx]
  return out


def test_reference_label_warp_is_bilinear_with_fill_0(monkeypatch):
  from glc_jax.data import recipes  # pylint: disable=import-outside-toplevel
  coords = []
  warp = recipes._warp_coords  # pylint: disable=protected-access
  monkeypatch.setattr(recipes, "_warp_coords", lambda *a: coords.append(warp(*a)) or coords[-1])
  s = 12
  rng = np.random.default_rng(4)
  label = rng.choice([1, 2, 5], (s, s)).astype(np.uint8)
  record = {"image": np.zeros((s, s, 3), np.uint8), "label": label}
  config = {"crop_size": s, "flip_probs": (1.0, 0.0, 0.0, 0.0), "rot_p": 0.0, "hsv_p": 0.0,
            "warp": {"p": 1.0, "shift": 0.2, "scale": 0.2}}
  reference = pipelines.recipe_for("finetune", dict(config, label_warp="reference"))
  ours = pipelines.recipe_for("finetune", config)
  zeros = 0
  for seed in range(6):
    got = reference(record, np.random.default_rng(seed))["label"]
    want = np.floor(_bilinear_fill0(label.astype(np.float64), *coords[-1]) + 0.5)
    np.testing.assert_array_equal(got, want)
    zeros += np.count_nonzero(got == 0)
    mine = ours(record, np.random.default_rng(seed))["label"]
    assert set(np.unique(mine)) <= {1, 2, 5, 255}
  assert zeros and not set(np.unique(got)) <= {0, 1, 2, 5}  # fill 0 and blends both occur
  with pytest.raises(ValueError, match="input.label_warp = 'linear'"):
    pipelines.recipe_for("finetune", dict(config, label_warp="linear"))


def _counting_state(step):
  return {"params": {"w": jnp.full((2,), float(step))}, "step": jnp.asarray(step, jnp.int32)}


def test_pretraining_keeps_the_epoch_with_the_lowest_mean_loss(tmp_path):
  """keep_best_loss: best_loss/ holds the epoch whose mean step loss is lowest
  (hand-computed), which is neither the last epoch nor the one with the lowest
  single step; fine-tuning's init.checkpoint="best_loss" reads it."""
  step_losses = [5.0, 1.0, 1.0, 2.0, 0.5, 9.0, 2.0, 3.0]  # epoch means 3, 1.5, 4.75, 2.5

  def train_step(state, batch, rng):
    del batch, rng
    step = int(state["step"]) + 1
    return _counting_state(step), {"loss": jnp.float32(step_losses[step - 1])}

  def run(total_steps):
    iterator = grain.MapDataset.range(100).to_iter_dataset().__iter__()
    _, ckpts = loop.fit(_counting_state(0), train_step, iterator, jax.random.key(0),
                        workdir=str(tmp_path), total_steps=total_steps, steps_per_epoch=2,
                        checkpoint_every=1, keep_checkpoints=2, log_every=100, items_per_step=1,
                        desc="test", keep_best_loss=True)
    ckpts.close()
  run(5)
  run(8)  # resumed mid-epoch 3: that epoch is not offered, the others are
  assert checkpoint.load_variables(tmp_path, "best_loss")["params"]["w"][0] == 4.0
  assert checkpoint.load_variables(tmp_path)["params"]["w"][0] == 8.0
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["step"]: r["epoch_loss"] for r in logged if "epoch_loss" in r} == {
      2: 3.0, 4: 1.5, 8: 2.5}
  with pytest.raises(FileNotFoundError, match="has no best_loss/"):
    checkpoint.load_variables(tmp_path / "checkpoints" / "8", "best_loss")


def test_finetune_init_checkpoint_key_is_checked(tmp_path):
  from glc_jax.stages import finetune, setup  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(init=dict(kind="checkpoint", path=str(tmp_path),
                                                    transfer="backbone", checkpoint="best")))
  with pytest.raises(setup.ConfigError, match="init.checkpoint is 'best'"):
    finetune.load_pretrained(config, 4)
  config.init.checkpoint = "best_loss"
  with pytest.raises(setup.ConfigError, match="has no best_loss/"):
    finetune.load_pretrained(config, 4)


def test_subset_list_is_the_records_of_the_images_it_names(tmp_path, caplog):
  """data_prep --subset-list 0.01=FILE: the 1% subset is every tile of the images
  FILE names (the reference's trainR1 list), not a seeded draw; others unchanged."""
  from data_prep import __main__ as cli  # pylint: disable=import-outside-toplevel
  from data_prep.convert import convert  # pylint: disable=import-outside-toplevel
  from data_prep.errors import DataPrepError  # pylint: disable=import-outside-toplevel
  from glc_jax.data.source import open_dataset  # pylint: disable=import-outside-toplevel
  caplog.set_level("INFO", logger="data_prep")
  scenes = tmp_path / "scenes"
  scenes.mkdir()
  rng = np.random.default_rng(0)
  transform = rasterio.transform.Affine(0.5, 0.0, 300000.0, 0.0, -0.5, 5800000.0)
  for i in range(6):  # 16x24 pixels: 6 tiles of 8 each
    with rasterio.open(scenes / f"top_{i}.tif", "w", driver="GTiff", height=16, width=24,
                       count=1, dtype="uint8", crs="EPSG:32632", transform=transform) as f:
      f.write(rng.integers(0, 256, (1, 16, 24), dtype=np.uint8))
  (tmp_path / "val.txt").write_text("top_0.tif\n")
  (tmp_path / "train.txt").write_text("".join(f"top_{i}.tif\n" for i in range(1, 6)))
  (tmp_path / "r1.txt").write_text("path/to/top_4.tif\ntop_2.tif\n")
  out = cli.main(["--images", str(scenes), "--out", str(tmp_path / "ds"), "--tile", "8", "--workers", "0",
                  "--no-progress", "--split-list", f"train={tmp_path / 'train.txt'}",
                  "--split-list", f"val={tmp_path / 'val.txt'}",
                  "--subset-list", f"0.01={tmp_path / 'r1.txt'}"])
  assert out == 0
  subset, info = open_dataset(tmp_path / "ds", "train", subset_fraction=0.01)
  named = sorted(subset[i]["scene_id"] for i in range(len(subset)))
  assert named == ["top_2"] * 6 + ["top_4"] * 6 and info.num_records == 12
  assert len(open_dataset(tmp_path / "ds", "train", subset_fraction=0.05)[0]) == 2  # seeded draw
  # The metadata counts the listed subset, and the log says where the list took effect.
  assert info.metadata["splits"]["train"]["subset_sizes"]["0.01"] == 12
  assert info.metadata["splits"]["val"]["subset_sizes"]["0.01"] == 1
  assert (f"labelled subset 0.01 of split 'train': the 12 tiles of the images {tmp_path / 'r1.txt'} "
          "names") in caplog.messages
  (tmp_path / "bad.txt").write_text("top_0.tif\ntop_9.tif\n")
  with pytest.raises(DataPrepError, match="bad.txt: 'top_9' is not among the images"):
    convert(str(scenes), tmp_path / "bad", tile=8, workers=0, progress=False,
            split_lists={"train": tmp_path / "train.txt", "val": tmp_path / "val.txt"},
            subset_lists={"0.01": tmp_path / "bad.txt"})
  with pytest.raises(DataPrepError, match="fraction must lie in"):
    convert(str(scenes), tmp_path / "bad", tile=8, workers=0, progress=False,
            subset_lists={"2": tmp_path / "r1.txt"})
  assert not (tmp_path / "bad").exists()


def test_reference_tile_miou_by_hand():
  """Two 2x3 tiles, 3 classes, 255 ignored. Tile 1: class 0 IoU 1/3, class 1
  2/4, class 2 (predicted only on the ignored pixel) absent → 0, as the reference
  scores it. Tile 2: class 0 absent → 0, class 1 1/4, class 2 2/5. Averaged over
  tiles then classes: (1/6 + 3/8 + 1/5) / 3."""
  from glc_jax import metrics  # pylint: disable=import-outside-toplevel
  t1 = metrics.tile_class_iou(np.array([[0, 0, 1], [1, 255, 1]]), np.array([[0, 1, 1], [1, 2, 0]]), 3)
  t2 = metrics.tile_class_iou(np.array([[1, 1, 2], [2, 2, 2]]), np.array([[1, 2, 2], [2, 1, 1]]), 3)
  np.testing.assert_allclose(t1, [1 / 3, 2 / 4, 0.0])
  np.testing.assert_allclose(t2, [0.0, 1 / 4, 2 / 5])
  assert metrics.reference_tile_miou([t1, t2]) == pytest.approx((1 / 6 + 3 / 8 + 1 / 5) / 3)
