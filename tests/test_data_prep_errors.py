"""data_prep under hostile conditions: folders it did not make, leftovers of killed
runs, killed parents, unwritable or full disks, broken names and non-finite pixels.

Oracles: the files a user put on disk (still there, byte for byte), the process
table (/proc), numpy masks of the fixture rasters, and the one-line error contract
of `python -m data_prep` (one line, naming the file or option, nothing left behind).
"""
import errno
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from data_prep import __main__ as cli
from data_prep import writer
from data_prep.convert import convert
from data_prep.errors import DataPrepError
from glc_jax.data.source import open_dataset
from conftest import assert_ignore_sigint
from test_data_prep import no_leftovers, random_scene, write_tif


def _cli_error(capsys, args):
  """Runs the CLI expecting a failure; returns its one error line."""
  code = cli.main(args + ["--workers", "0", "--no-progress"])
  lines = capsys.readouterr().err.strip().splitlines()
  assert code != 0
  assert len(lines) == 1 and lines[0].startswith("data_prep: error: "), lines
  return lines[0]


@pytest.fixture
def scene(tmp_path):
  write_tif(tmp_path / "a.tif", random_scene(np.random.default_rng(0), "uint8", 2, 32, 32))
  return tmp_path / "a.tif"


def _files(folder):
  return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- --overwrite replaces only what data_prep made ---------------------------------


@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_folder_that_is_not_a_dataset_is_never_replaced(tmp_path, capsys, scene, flag):
  user = tmp_path / "out"
  (user / "sub").mkdir(parents=True)
  (user / "thesis.tex").write_text("years of work")
  (user / "sub" / "data.csv").write_text("1,2,3")
  before = _files(user)
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(user)] + flag)
  assert str(user) in line and "not a data_prep dataset" in line
  assert "--overwrite" not in line
  assert _files(user) == before
  assert not list(tmp_path.glob(".out.*"))


def test_dataset_holding_foreign_files_is_not_replaced(tmp_path, capsys, scene):
  out = convert(str(scene), tmp_path / "out", tile=16, workers=0, progress=False)
  (out / "notes.txt").write_text("mine")
  before = _files(out)
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "8", "--out", str(out), "--overwrite"])
  assert "notes.txt" in line
  assert _files(out) == before and not list(tmp_path.glob(".out.*"))


def test_existing_file_is_not_replaced_and_nothing_is_left(tmp_path, capsys, scene):
  target = tmp_path / "out"
  target.write_text("a file")
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(target), "--overwrite"])
  assert str(target) in line and "not a data_prep dataset" in line
  assert target.read_text() == "a file"
  assert not list(tmp_path.glob(".out.*"))


def test_overwrite_replaces_a_dataset_and_an_empty_folder_is_used(tmp_path, scene):
  out = convert(str(scene), tmp_path / "out", tile=16, workers=0, progress=False)
  convert(str(scene), out, tile=8, workers=0, progress=False, overwrite=True)
  assert open_dataset(out, "train")[1].num_records == 16
  (tmp_path / "empty").mkdir()
  convert(str(scene), tmp_path / "empty", tile=16, workers=0, progress=False)
  assert open_dataset(tmp_path / "empty", "train")[1].num_records == 4
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- one run per dataset, robust to PID reuse ---------------------------------------


def test_leftover_of_a_killed_run_whose_pid_was_reused_does_not_block(tmp_path, scene):
  # A live process that is not data_prep (this test's parent) now owns the PID
  # that the killed run put in its temp folder's name.
  leftover = tmp_path / f".out.incomplete-{os.getppid()}"
  leftover.mkdir()
  (leftover / "train.partial-0").write_bytes(b"half a shard")
  out = convert(str(scene), tmp_path / "out", tile=16, workers=0, progress=False)
  assert open_dataset(out, "train")[1].num_records == 4
  assert not leftover.exists() and not list(tmp_path.glob(".out.*"))


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from data_prep import output_folder
    with output_folder.lock(Path(sys.argv[1])):
      print("locked", flush=True)
      time.sleep(120)
""")


def test_live_run_is_refused_and_its_death_frees_the_dataset(tmp_path, scene):
  out = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(DataPrepError, match=rf"{out}: another data_prep run \(pid {holder.pid}\)"):
      convert(str(scene), out, tile=16, workers=0, progress=False)
  finally:
    holder.kill()
    holder.wait()
  convert(str(scene), out, tile=16, workers=0, progress=False)
  assert open_dataset(out, "train")[1].num_records == 4 and not list(tmp_path.glob(".out.*"))


# --- reader workers die with their parent -------------------------------------------


def _children(pid):
  children = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        children.append(int(entry))
  return children


def _running(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")
def test_reader_workers_exit_when_the_parent_is_killed(tmp_path):
  write_tif(tmp_path / "big.tif", np.random.default_rng(5).integers(0, 256, (4, 1024, 1024), dtype=np.uint8))
  proc = subprocess.Popen(
      [sys.executable, "-m", "data_prep", "--images", str(tmp_path / "big.tif"), "--out",
       str(tmp_path / "out"), "--tile", "16", "--workers", "2", "--no-progress"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 60
  workers = []
  while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
    workers = _children(proc.pid)
    time.sleep(0.01)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert len(workers) >= 2, "the conversion ended before its workers were seen"
  deadline = time.time() + 5
  while any(map(_running, workers)) and time.time() < deadline:
    time.sleep(0.05)
  alive = [pid for pid in workers if _running(pid)]
  for pid in alive:
    os.kill(pid, signal.SIGKILL)
  assert not alive, f"workers {alive} outlived their killed parent"


# --- one-line errors ----------------------------------------------------------------


def test_missing_split_list_is_one_line(tmp_path, capsys, scene):
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(tmp_path / "out"),
                             "--split-list", f"train={tmp_path / 'nope.txt'}"])
  assert "nope.txt" in line and no_leftovers(tmp_path)


def test_invalid_group_pattern_is_one_line(tmp_path, capsys, scene):
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(tmp_path / "out"),
                             "--split-fractions", "train=1", "--group-pattern", "(city_"])
  assert "--group-pattern" in line and "(city_" in line and no_leftovers(tmp_path)


def test_read_only_output_folder_is_one_line(tmp_path, capsys, scene, monkeypatch):
  parent = tmp_path / "ro"
  parent.mkdir()
  real_open, real_mkdir = os.open, os.mkdir
  def refuse(path):
    if str(path).startswith(str(parent)):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  def ro_open(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      refuse(path)
    return real_open(path, flags, *args, **kwargs)
  def ro_mkdir(path, *args, **kwargs):
    refuse(path)
    return real_mkdir(path, *args, **kwargs)
  monkeypatch.setattr(os, "open", ro_open)
  monkeypatch.setattr(os, "mkdir", ro_mkdir)
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(parent / "out")])
  assert str(parent / "out") in line and "Read-only file system" in line
  assert not list(parent.iterdir())


class _FullDiskWriter:
  """ArrayRecordWriter on a full disk: ArrayRecord reports ENOSPC as a RuntimeError
  when it flushes a chunk (seen on a 1 MiB tmpfs), here after two records."""

  def __init__(self, path, options):
    self._file = open(path, "wb")
    self._records = 0

  def write(self, data):
    self._records += 1
    if self._records > 2:
      raise RuntimeError(f"write() failed: No space left on device; writing {self._file.name}; at byte 0")
    self._file.write(data)

  def close(self):
    self._file.close()


def _enospc_metadata(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "dataset_info.json")


@pytest.mark.parametrize("where", ["shards", "metadata"])
def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, scene, monkeypatch, where):
  if where == "shards":
    monkeypatch.setattr(writer, "ArrayRecordWriter", _FullDiskWriter)
  else:
    monkeypatch.setattr(writer.tfds.folder_dataset, "write_metadata", _enospc_metadata)
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "8", "--out", str(tmp_path / "out")])
  assert str(tmp_path / "out") in line and "No space left on device" in line
  assert no_leftovers(tmp_path)


@pytest.mark.parametrize("rows, message", [
    ("road,255,255,255\nroof,0,0,255\nsnow,255,255,255",
     "line 4: colour (255, 255, 255) of 'snow' is already given to 'road' on line 2"),
    # Scores are kept per class name: the second 'building' would overwrite the first's.
    ("road,255,255,255\nbuilding,0,0,255\nbuilding,0,255,255",
     "line 4: class name 'building' is already given to colour (0, 0, 255) on line 3"),
    # Lines are the file's, blank ones counted.
    ("road,255,255,255\n\nroof,0,0,255\n\nsnow,255,255,255",
     "line 6: colour (255, 255, 255) of 'snow' is already given to 'road' on line 2"),
])
def test_a_class_map_giving_a_colour_or_a_name_twice_names_both_lines(tmp_path, capsys, scene, rows,
                                                                      message):
  csv = tmp_path / "classes.csv"
  csv.write_text(f"name,R,G,B\n{rows}\n")
  write_tif(tmp_path / "lbl.tif", np.zeros((3, 32, 32), np.uint8))
  line = _cli_error(capsys, ["--images", str(scene), "--labels", str(tmp_path / "lbl.tif"),
                             "--label-stem-replace", "a=lbl", "--class-map", str(csv), "--tile", "16",
                             "--out", str(tmp_path / "out")])
  assert line == f"data_prep: error: {csv}: {message}"
  assert not (tmp_path / "out").exists()


def test_directory_named_like_a_geotiff_is_reported_as_a_directory(tmp_path, capsys, scene):
  (tmp_path / "x.tif").mkdir()
  line = _cli_error(capsys, ["--images", str(tmp_path), "--tile", "16", "--out", str(tmp_path / "out")])
  assert f"{tmp_path / 'x.tif'}: is a directory, not a GeoTIFF" in line
  line = _cli_error(capsys, ["--images", str(tmp_path / "*.tif"), "--tile", "16",
                             "--out", str(tmp_path / "out")])
  assert "is a directory, not a GeoTIFF" in line


# --- non-finite pixels are nodata ---------------------------------------------------


@pytest.mark.parametrize("nodata,fill", [(None, 0.0), (-9999.0, -9999.0)])
def test_non_finite_pixels_are_nodata_and_never_written(tmp_path, nodata, fill):
  rng = np.random.default_rng(7)
  image = rng.normal(100.0, 20.0, (2, 32, 32)).astype(np.float32)
  image[0, 3, 5] = np.nan
  image[1, 10, 12] = np.inf
  image[0, 20, 7] = -np.inf
  image[:, 16:, 16:] = np.nan  # a whole tile: skipped as nodata
  write_tif(tmp_path / "f.tif", image, nodata=nodata)
  write_tif(tmp_path / "f_lbl.tif", rng.integers(0, 4, (1, 32, 32), dtype=np.uint8))
  out = convert(str(tmp_path / "f.tif"), tmp_path / "out", labels=str(tmp_path / "f_lbl.tif"),
                label_stem_replace=("f", "f_lbl"), tile=16, workers=0, progress=False)
  source, info = open_dataset(out, "train")
  bad_pixel = ~np.isfinite(image).all(axis=0)
  kept = np.ones((32, 32), bool)
  kept[16:, 16:] = False
  windows = sorted(tuple(int(v) for v in source[i]["window"][:2]) for i in range(len(source)))
  assert windows == [(0, 0), (0, 16), (16, 0)]
  for i in range(len(source)):
    rec = source[i]
    r, c = (int(v) for v in rec["window"][:2])
    want = np.moveaxis(image[:, r:r + 16, c:c + 16], 0, -1)
    want = np.where(np.isfinite(want), want, np.float32(fill))
    np.testing.assert_array_equal(rec["image"], want)
    assert (rec["label"][bad_pixel[r:r + 16, c:c + 16]] == 255).all()
  valid = (kept & ~bad_pixel)
  np.testing.assert_allclose(info.band_stats.mean, image[:, valid].astype(np.float64).mean(1), rtol=1e-12)
  assert info.metadata["splits"]["train"]["nonfinite_pixel_count"] == 3


def test_scene_without_a_finite_pixel_is_one_line(tmp_path, capsys):
  good = np.random.default_rng(8).normal(0, 1, (1, 32, 32)).astype(np.float32)
  write_tif(tmp_path / "good.tif", good)
  write_tif(tmp_path / "nan.tif", np.full((1, 32, 32), np.nan, np.float32))
  line = _cli_error(capsys, ["--images", str(tmp_path / "good.tif"), str(tmp_path / "nan.tif"),
                             "--tile", "16", "--max-nodata-fraction", "1", "--out", str(tmp_path / "out")])
  assert f"{tmp_path / 'nan.tif'}: " in line and "NaN" in line
  assert no_leftovers(tmp_path)


@pytest.mark.parametrize("where", ["out", "images", "labels"])
def test_convert_called_from_python_refuses_urls_too(tmp_path, monkeypatch, scene, where):
  """The CLI and the function share one check: a URL would otherwise become a relative
  local folder (gs:/bucket/...) under the working directory."""
  monkeypatch.chdir(tmp_path)
  paths = {"images": [str(scene)], "out": str(tmp_path / "out"), "labels": None}
  paths[where] = pathlib.Path("gs://bucket/tiles") if where == "out" else ["s3://bucket/scene.tif"]
  with pytest.raises(DataPrepError, match=f"^{where} (gs|s3):/+bucket/.*: URLs are not supported"):
    convert(paths["images"], paths["out"], paths["labels"], tile=16, progress=False)
  assert not (tmp_path / "gs:").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value", [("--stride", "0"), ("--stride", "-5"), ("--tile", "0")])
def test_zero_or_negative_tile_or_stride_is_one_line(tmp_path, capsys, scene, flag, value):
  """An explicit --stride 0 is refused, not read as 'default to the tile size'."""
  args = ["--images", str(scene), "--tile", "16", "--out", str(tmp_path / "out")]
  line = _cli_error(capsys, args + [flag, value])
  assert f"{flag[2:]} {value} must be" in line and no_leftovers(tmp_path)


# --- Ctrl-C -----------------------------------------------------------------------------


def test_reader_workers_leave_ctrl_c_to_the_parent(tmp_path):
  """A terminal's Ctrl-C reaches the whole process group; a worker that took it would print
  its own KeyboardInterrupt traceback above data_prep's (or train.py's) one line."""
  import multiprocessing  # pylint: disable=import-outside-toplevel

  from data_prep import convert as convert_lib, scenes, tiling  # pylint: disable=import-outside-toplevel
  write_tif(tmp_path / "a.tif", random_scene(np.random.default_rng(0), "uint8", 2, 64, 64))
  scene, = scenes.inspect_scenes([tmp_path / "a.tif"], None, tile=16)
  jobs = [tiling.TileJob(scene, scenes.scene_windows(scene, 16, 16, True))] * 4
  handler = signal.getsignal(signal.SIGINT)
  before = set(multiprocessing.active_children())
  chunks = convert_lib._run_jobs(jobs, tiling.TileOptions(), workers=2)  # pylint: disable=protected-access
  try:
    assert len(next(chunks).records) == 16
    assert_ignore_sigint([p for p in multiprocessing.active_children() if p not in before])
  finally:
    chunks.close()
  assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.parametrize("nodata", ["-1", "300", "1.5", "nan"])
def test_a_nodata_the_pixel_type_cannot_hold_is_refused(tmp_path, capsys, scene, nodata):
  """Cast to uint8, -1 would be 255: every white pixel would become nodata, silently."""
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(tmp_path / "out"),
                             f"--nodata={nodata}"])
  assert line == (f"data_prep: error: {scene}: --nodata {float(nodata):g} is not a uint8 value "
                  "(whole numbers 0..255), so no pixel can have it")
  assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("flag, first, second", [
    ("--split-list", "train=a.txt", "train=b.txt"),
    ("--subset-list", "0.01=a.txt", "0.010=b.txt"),
])
def test_a_list_given_twice_for_one_name_is_refused(tmp_path, capsys, scene, flag, first, second):
  """A dict of the flags kept the last file and dropped the first one's scenes, silently."""
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(tmp_path / "out"),
                             flag, first, flag, second])
  name = second.partition("=")[0]
  assert line == (f"data_prep: error: {flag}: {name} is given twice (a.txt, b.txt); give one "
                  "list per name")
  assert not (tmp_path / "out").exists()


def test_a_mount_point_as_out_is_refused_before_any_work(tmp_path, capsys, scene, monkeypatch):
  """An empty volume mounted as --out cannot be renamed into place: the conversion used to run to
  its end and then fail with 'Device or resource busy'."""
  volume = tmp_path / "volume"
  volume.mkdir()
  real_ismount = os.path.ismount
  monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(volume) or real_ismount(p))
  line = _cli_error(capsys, ["--images", str(scene), "--tile", "16", "--out", str(volume)])
  assert line == (f"data_prep: error: {volume}: is a mount point, which data_prep cannot replace (it "
                  "builds the dataset beside --out and renames it into place); use a folder inside "
                  f"it, e.g. --out {volume / 'dataset'}")
  assert list(volume.iterdir()) == [] and not list(tmp_path.glob(".volume.*"))
