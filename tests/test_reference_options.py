"""The `reference` protocol's switches, each against an independent oracle."""
import numpy as np
import pytest

from glc_jax.data import pipelines


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
  with pytest.raises(ValueError, match="num_permutations = 1000"):
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
