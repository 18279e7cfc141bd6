"""glc_jax/files.py: outputs appear whole under their name or not at all, with the
permissions any file the user writes gets (colleagues on a shared disk read our results)."""
import os
import stat

import numpy as np
import pytest

from glc_jax import files, predictions


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield 0o644
  os.umask(old)


def _mode(path):
  return stat.S_IMODE(path.stat().st_mode)


def test_a_completed_block_replaces_the_file_and_leaves_no_temporary(tmp_path, umask_022):
  target = tmp_path / "sub" / "out.txt"
  files.write_text_atomic(target, "old")
  with files.atomic_path(target) as temp:
    assert temp.parent == target.parent and temp.name.startswith(".out.txt")
    temp.write_text("new")
    assert target.read_text() == "old"  # not replaced before the block ends
  assert target.read_text() == "new"
  assert _mode(target) == umask_022
  assert sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]


def test_a_failed_block_keeps_the_old_file_and_removes_the_temporary_and_its_sidecars(tmp_path):
  target = tmp_path / "scene.tif"
  target.write_text("old")
  with pytest.raises(RuntimeError), files.atomic_path(target, (".aux.xml",)) as temp:
    temp.write_text("half")
    temp.with_name(temp.name + ".aux.xml").write_text("gdal")
    raise RuntimeError("killed mid-write")
  assert target.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_the_leftover_of_a_killed_write_is_replaced_not_accumulated(tmp_path):
  files.temp_beside(tmp_path / "log.txt").write_text("cut sh")  # as SIGKILL mid-write leaves it
  files.write_text_atomic(tmp_path / "log.txt", "whole")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt"]


def test_prediction_rasters_and_figures_get_the_umask_permissions(tmp_path, umask_022):
  colours = [(255, 255, 255), (0, 0, 255)]
  classes = np.array([[0, 1], [1, 0]], np.uint8)
  predictions.write_prediction(tmp_path / "pred.tif", tmp_path / "pred_rgb.tif", classes,
                               crs="EPSG:32633", transform=(0.05, 0, 368000, 0, -0.05, 5808000),
                               colours=colours)
  predictions.write_confusion_matrix_png(tmp_path / "cm.png", np.array([[3, 1], [0, 4]]),
                                         ["a", "b"])
  written = sorted(p.name for p in tmp_path.iterdir())
  assert written == ["cm.png", "pred.tif", "pred_rgb.tif"]
  assert {_mode(tmp_path / name) for name in written} == {umask_022}


class _FullDisk:
  """A dataset whose close flushes and then fails, as GDAL's does when the disk fills."""

  def __init__(self, dataset):
    self._dataset = dataset

  def close(self):
    self._dataset.close()
    raise OSError(28, "No space left on device")


def test_a_prediction_whose_flush_fails_leaves_nothing(tmp_path):
  writer = predictions.PredictionWriter(
      tmp_path / "pred.tif", tmp_path / "pred_rgb.tif", height=2, width=2, crs="EPSG:32633",
      transform=(0.05, 0, 368000, 0, -0.05, 5808000), colours=[(255, 255, 255), (0, 0, 255)])
  with pytest.raises(OSError, match="No space left"), writer:
    writer.write(np.array([[0, 1], [1, 0]], np.uint8))
    writer._datasets[0] = _FullDisk(writer._datasets[0])  # pylint: disable=protected-access
  assert list(tmp_path.iterdir()) == []
