"""benchmarks/bench_pipeline.py: the side-by-side summary, the CPU line, and its
one-line errors for a bad tile, checkout or torch Python (no torch needed)."""
import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import rasterio

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "bench_pipeline.py"
_spec = importlib.util.spec_from_file_location("bench_pipeline", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma

processor\t: 1
model name\t: Another CPU
flags\t\t: avx2 avx512f
"""


def test_cpu_line_reads_the_first_processor_and_its_vector_flags():
  assert bench.cpu_description(_CPUINFO) == (
      "AMD EPYC 7B13, family 25 model 1, avx2 yes, avx512f no")
  assert bench.cpu_description("flags : sse avx512f\n") == (
      "unknown CPU, family ? model ?, avx2 no, avx512f yes")


def test_ratio_is_the_median_of_per_round_ratios():
  # Rounds: 100/50 = 2, 300/100 = 3, 200/40 = 5 -> 3; the ratio of the medians
  # (200/50 = 4) would let a load swing in one round move the result.
  got = bench.paired_summary([100.0, 300.0, 200.0], [50.0, 100.0, 40.0])
  assert got == {"ours": 200.0, "reference": 50.0, "ratio": 3.0}
  with pytest.raises(ValueError, match="same non-zero number of rounds"):
    bench.paired_summary([1.0, 2.0], [1.0])


def _run_main(argv, capsys):
  with pytest.raises(SystemExit) as e:
    bench.main(argv)
  out = capsys.readouterr()
  assert out.out == ""  # an error comes before any table line
  return str(e.value.code)


def _write_raster(path, array):
  bands, h, w = array.shape
  with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=bands,
                     dtype=array.dtype, crs="EPSG:32633",
                     transform=rasterio.Affine(0.05, 0, 5e5, 0, -0.05, 5.8e6)) as dst:
    dst.write(array)


def test_tile_must_be_256_square_4_band_uint8(tmp_path, capsys):
  _write_raster(tmp_path / "rgb.tif", np.zeros((3, 64, 64), np.uint8))
  msg = _run_main(["--tile", str(tmp_path / "rgb.tif")], capsys)
  assert msg == (f"bench_pipeline: {tmp_path / 'rgb.tif'}: expected a 256x256 "
                 "4-band uint8 tile, got shape (64, 64) x 3 bands, uint8")
  (tmp_path / "text.tif").write_text("not a raster")
  msg = _run_main(["--tile", str(tmp_path / "text.tif")], capsys)
  assert msg.startswith(f"bench_pipeline: {tmp_path / 'text.tif'}: cannot read "
                        "as a raster (")


def test_tile_is_read_as_rows_columns_bands(tmp_path):
  tile = np.random.default_rng(0).integers(0, 256, (256, 256, 4), np.uint8)
  _write_raster(tmp_path / "t.tif", np.moveaxis(tile, -1, 0))
  np.testing.assert_array_equal(bench.load_tile(str(tmp_path / "t.tif")), tile)


def test_reference_checkout_and_python_are_checked(tmp_path, capsys):
  msg = _run_main(["--reference", str(tmp_path), "--torch-python",
                   sys.executable], capsys)
  assert msg == (f"bench_pipeline: --reference {tmp_path}: no "
                 "utils/data_for_self_GLCNet.py there (expected the "
                 "T-SS-GLCNet folder of a G-RSIM checkout)")
  (tmp_path / "utils").mkdir()
  (tmp_path / "utils" / "data_for_self_GLCNet.py").write_text("")
  msg = _run_main(["--reference", str(tmp_path), "--torch-python",
                   str(tmp_path / "no-python")], capsys)
  assert msg.startswith(f"bench_pipeline: --torch-python {tmp_path / 'no-python'}"
                        ": cannot run (")
  # This project's Python has no opencv/torch: the worker's last error line.
  msg = _run_main(["--reference", str(tmp_path), "--torch-python",
                   sys.executable], capsys)
  assert msg.startswith("bench_pipeline: reference worker exited (1): "
                        "ModuleNotFoundError: No module named "), msg
