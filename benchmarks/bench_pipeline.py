"""Throughput of the GLCNet pretraining input on the host, beside the reference.

For 256x256 4-band uint8 tiles -> two 224x224 views with 4 patches of 48 and
of 16 pixels, on ONE core, this measures:
  * matched-patch sampling alone (ms per pair),
  * one pair through the recipe (crop, views, augmentation, patches),
  * the full Grain pipeline in this process (batching included), pairs/s,
and, with --reference, the reference's data path in the same run: its
T-SS-GLCNet Train_Dataset (utils/data_for_self_GLCNet.py, built by its own
constructor over the same tiles, held in memory) through a torch DataLoader
with the same batch size and no workers, run by a user-given Python that has
torch, torchvision, opencv, scikit-image and tifffile; the reference's patch
sampling (its get_index) is timed inside that same pass. Nothing of the
reference is part of this project: it is loaded from --reference at run time.

Both sides run one after the other, never together, in --rounds rounds whose
order alternates (ours first, then the reference first, ...), so load from
other processes on a shared machine falls on both alike; each figure is the
median over the rounds, and a ratio is the median of the per-round ratios.
Thread pools are limited to one thread on both sides.

  python benchmarks/bench_pipeline.py [--pairs 128] [--batch 32] [--rounds 3]
      [--tile PATH.tif] [--workers N]
      [--reference PATH/T-SS-GLCNet --torch-python PATH/bin/python]
"""
from __future__ import annotations

import os

# One core per side: BLAS/OpenMP pools size themselves when numpy (or, in the
# reference's worker, torch and opencv) loads, so the caps go in first.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "OPENBLAS_NUM_THREADS": "1"}
if __name__ == "__main__":
  os.environ.update(ONE_THREAD)

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from glc_jax.data import augment, pipelines, recipes
from glc_jax.data.patches import ViewGeometry, sample_matched_patches

TILE_SHAPE = (256, 256, 4)
REFERENCE_MODULE = "utils/data_for_self_GLCNet.py"
PATCH_SIZES = (48, 16)
PATCH_NUM = 4

# Runs in the reference's environment. It builds the reference's own
# Train_Dataset (constructor included) over the given tiles, written as TIFFs
# into a temporary dataset folder laid out as that constructor reads, and
# answers one JSON line per request on stdin: "<patch> <batches>" ->
# {"pairs_per_s", "pairs_per_cpu_s", "sampling_ms"} over <batches> batches
# after one warm-up batch of a fresh DataLoader iterator.
# The reference's prints go to stderr; stdout carries only the protocol.
_REFERENCE_WORKER = r"""
import importlib.util, json, os, random, sys, time, types
ref, tiles_path, batch, batches, patch_sizes, patch_num = sys.argv[1:7]
batch, batches, patch_num = int(batch), int(batches), int(patch_num)
out = os.fdopen(os.dup(1), "w")
sys.stdout = sys.stderr
import numpy as np, cv2, tifffile, torch
from torch.utils.data import DataLoader
cv2.setNumThreads(1)
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location(
    "reference_glcnet_data", os.path.join(ref, "utils", "data_for_self_GLCNet.py"))
data = importlib.util.module_from_spec(spec)
spec.loader.exec_module(data)
sampling = [0.0, 0]
get_index = data.get_index
def timed_get_index(*a, **k):
  t0 = time.perf_counter()
  try:
    return get_index(*a, **k)
  finally:
    sampling[0] += time.perf_counter() - t0
    sampling[1] += 1
data.get_index = timed_get_index
class SetSampling(random.Random):
  # Python 3.11 dropped random.sample from a set, which the reference's
  # patch sampling does; up to 3.10 it sampled from tuple(population).
  def sample(self, population, k, **kw):
    if isinstance(population, (set, frozenset)):
      population = tuple(population)
    return super().sample(population, k, **kw)
data.random = SetSampling(0)
tiles = np.load(tiles_path)
root = os.path.join(os.path.dirname(tiles_path), "reference_dataset")
os.makedirs(os.path.join(root, "train_RGBIR"))
for i, tile in enumerate(tiles):
  tifffile.imwrite(os.path.join(root, "train_RGBIR", f"t{i}.tif"), tile,
                   photometric="minisblack", planarconfig="contig")
with open(os.path.join(root, "train_RGBIR.txt"), "w") as f:
  f.writelines(f"t{i % len(tiles)}.tif\n" for i in range((batches + 1) * batch))
datasets = {}
for p in map(int, patch_sizes.split(",")):
  opt = types.SimpleNamespace(
      patch_size=p, patch_num=patch_num, dataset_dir=root, dtype="RGBIR",
      quick_train=True, crop_mode="random", bl_dtype=None, input_size=(224, 224))
  datasets[p] = data.Train_Dataset(root, "train", opt)
if not all(any(np.array_equal(ds.imgs[0], t) for t in tiles)
           for ds in datasets.values()):
  raise SystemExit("the reference did not read back the benchmark's tiles")
np.random.seed(0)
torch.manual_seed(0)
out.write(json.dumps(dict(torch=torch.__version__, numpy=np.__version__,
                          cv2=cv2.__version__)) + "\n")
out.flush()
for line in sys.stdin:
  p, n = map(int, line.split())
  it = iter(DataLoader(datasets[p], batch_size=batch, shuffle=True,
                       num_workers=0, drop_last=True))
  next(it)
  sampling[:] = [0.0, 0]
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(n):
    next(it)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  out.write(json.dumps(dict(pairs_per_s=n * batch / wall,
                            pairs_per_cpu_s=n * batch / cpu,
                            sampling_ms=1e3 * sampling[0] / sampling[1])) + "\n")
  out.flush()
"""


class BenchError(Exception):
  """A bad benchmark input (a tile, a reference checkout) or a failed worker."""


def cpu_description(cpuinfo: str) -> str:
  """'model name, family F model M, avx2 yes|no, avx512f yes|no' of /proc/cpuinfo text."""
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if not sep:
      if fields:
        break  # the first processor's block is enough
      continue
    fields.setdefault(key.strip(), value.strip())
  flags = set(fields.get("flags", "").split())
  return (f"{fields.get('model name', 'unknown CPU')}, family "
          f"{fields.get('cpu family', '?')} model {fields.get('model', '?')}, "
          + ", ".join(f"{f} {'yes' if f in flags else 'no'}"
                      for f in ("avx2", "avx512f")))


def paired_summary(ours: list[float], reference: list[float]) -> dict:
  """Medians of two rates measured round by round, and of their ratios.

  The ratio is taken within each round (both sides ran back to back under
  the same outside load) before the median, not between the two medians.
  """
  if len(ours) != len(reference) or not ours:
    raise ValueError(f"need the same non-zero number of rounds per side, got "
                     f"{len(ours)} and {len(reference)}")
  return dict(ours=statistics.median(ours),
              reference=statistics.median(reference),
              ratio=statistics.median(a / b for a, b in zip(ours, reference)))


def load_tile(path: str) -> np.ndarray:
  """A 256x256 4-band uint8 raster as (H, W, C), or BenchError naming `path`."""
  # rasterio only when a tile is given
  from rasterio.errors import RasterioError
  from data_prep.scenes import open_raster
  try:
    with open_raster(path) as src:
      tile = np.moveaxis(src.read(), 0, -1)
  except (RasterioError, OSError) as e:
    raise BenchError(f"{path}: cannot read as a raster "
                     f"({(str(e) or type(e).__name__).splitlines()[0]})"
                     ) from None
  if tile.shape != TILE_SHAPE or tile.dtype != np.uint8:
    raise BenchError(f"{path}: expected a 256x256 4-band uint8 tile, got shape "
                     f"{tile.shape[:2]} x {tile.shape[2]} bands, {tile.dtype}")
  return tile


def check_reference(path: str) -> None:
  if not (pathlib.Path(path) / REFERENCE_MODULE).is_file():
    raise BenchError(f"--reference {path}: no {REFERENCE_MODULE} there "
                     "(expected the T-SS-GLCNet folder of a G-RSIM checkout)")


class ReferenceWorker:
  """The reference's data path in a process of the user's torch Python."""

  def __init__(self, torch_python: str, reference: str, tiles: np.ndarray,
               batch: int, batches: int, workdir: str):
    tiles_path = os.path.join(workdir, "tiles.npy")
    np.save(tiles_path, tiles)
    self._stderr = open(os.path.join(workdir, "stderr"), "w+")  # pylint: disable=consider-using-with
    try:
      self._proc = subprocess.Popen(  # pylint: disable=consider-using-with
          [torch_python, "-c", _REFERENCE_WORKER, reference, tiles_path,
           str(batch), str(batches), ",".join(map(str, PATCH_SIZES)),
           str(PATCH_NUM)],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
          env={**os.environ, **ONE_THREAD}, text=True)
    except OSError as e:
      raise BenchError(f"--torch-python {torch_python}: cannot run "
                       f"({e.strerror})") from None
    try:
      self.versions = self._reply()
    except BenchError:
      self.close()
      raise

  def _reply(self) -> dict:
    line = self._proc.stdout.readline()
    if not line:
      self._proc.wait()
      self._stderr.seek(0)
      tail = self._stderr.read().strip().splitlines()[-1:] or ["no output"]
      raise BenchError(f"reference worker exited ({self._proc.returncode}): "
                       f"{tail[0]}")
    return json.loads(line)

  def rate(self, patch: int, batches: int) -> dict:
    try:
      self._proc.stdin.write(f"{patch} {batches}\n")
      self._proc.stdin.flush()
    except BrokenPipeError:
      pass  # the worker died: _reply reports its last words
    return self._reply()

  def close(self) -> None:
    if self._proc.poll() is None:
      self._proc.stdin.close()
      self._proc.wait()
    self._stderr.close()


def _geometries(rng, cfg: recipes.TwoViewConfig, count: int):
  c = cfg.crop
  out = []
  for _ in range(count):
    box = lambda: augment.random_resized_crop_box(
        rng, (cfg.tile_crop, cfg.tile_crop), c.scale, c.ratio, c.swap_p,
        c.attempts)
    out.append((ViewGeometry(box(), cfg.view_size),
                ViewGeometry(box(), cfg.view_size, int(rng.integers(4)),
                             int(rng.integers(4)))))
  return out


def _per_item_seconds(fn, items) -> float:
  start = time.perf_counter()
  for item in items:
    fn(item)
  return (time.perf_counter() - start) / len(items)


def _pipeline_rates(it, batches: int, batch: int) -> dict:
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  return dict(pairs_per_s=batches * batch / (time.perf_counter() - start),
              pairs_per_cpu_s=batches * batch / (time.process_time() - cpu))


class _Ours:
  """This project's side for one patch size; each call times one round."""

  def __init__(self, tiles: np.ndarray, patch: int, args, rng):
    self.cfg = recipes.TwoViewConfig(patch_size=patch, patch_num=PATCH_NUM)
    self._rng = rng
    self._geos = _geometries(rng, self.cfg, args.pairs)
    self._records = [{"image": tiles[i % len(tiles)]}
                     for i in range(max(args.pairs, args.batch))]
    self.ds = pipelines.train_dataset(
        self._records, pipelines.recipe_for("glcnet", self.cfg),
        batch_size=args.batch, seed=0, process_index=0, process_count=1)
    self._it = pipelines.make_iterator(self.ds)
    next(self._it)
    self.time_round(args)  # warm-up

  def time_round(self, args) -> dict:
    patch, rng = self.cfg.patch_size, self._rng
    sample_s = _per_item_seconds(
        lambda g: sample_matched_patches(rng, g[0], g[1], patch, PATCH_NUM),
        self._geos)
    recipe_s = _per_item_seconds(
        lambda r: recipes.two_view_example(r, rng, self.cfg),
        self._records[:args.pairs])
    return dict(sampling_ms=sample_s * 1e3, recipe_pairs_per_s=1 / recipe_s,
                **_pipeline_rates(self._it, args.batches, args.batch))


def _tiles(args) -> tuple[np.ndarray, str]:
  if args.tile:
    return load_tile(args.tile)[None], f"the tile {args.tile}"
  rng = np.random.default_rng(0)
  return (rng.integers(0, 256, (64,) + TILE_SHAPE, dtype=np.uint8),
          "64 uniform-noise tiles (seed 0)")


def _fmt(x: float, digits: int = 0) -> str:
  return f"{x:.{digits}f}"


def run(args) -> None:
  tiles, what = _tiles(args)
  with open("/proc/cpuinfo") as f:
    cpu = cpu_description(f.read())
  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as workdir:
    ref = None
    if args.reference:
      ref = ReferenceWorker(args.torch_python, args.reference, tiles,
                            args.batch, args.batches, workdir)
    try:
      print(f"# bench_pipeline {time.strftime('%Y-%m-%d')}  {cpu}  "
            f"{os.cpu_count()} cpus (load average {os.getloadavg()[0]:.1f})")
      print(f"# {what}; {args.batches} batches of {args.batch} pairs per "
            f"round after warm-up, median of {args.rounds} rounds; ours: "
            f"numpy {np.__version__}")
      if ref is not None:
        print("# reference: " + ", ".join(f"{k} {v}"
                                          for k, v in ref.versions.items()))
      _table(args, tiles, ref)
    finally:
      if ref is not None:
        ref.close()


def _table(args, tiles, ref) -> None:
  rng = np.random.default_rng(0)
  print("| patch | sampling ms/pair: ours | reference | recipe pairs/s (ours) "
        "| pipeline pairs/s: ours | reference | ours/ref. "
        "| pairs per CPU-second: ours | reference | ours/ref. |")
  print("|---" * 10 + "|")
  for patch in PATCH_SIZES:
    ours = _Ours(tiles, patch, args, rng)
    if ref is not None:
      ref.rate(patch, 1)  # warm-up
    ours_rounds, ref_rounds = [], []
    for r in range(args.rounds):
      if ref is not None and r % 2:
        ref_rounds.append(ref.rate(patch, args.batches))
      ours_rounds.append(ours.time_round(args))
      if ref is not None and not r % 2:
        ref_rounds.append(ref.rate(patch, args.batches))
    print("| " + " | ".join(_row(patch, ours_rounds, ref_rounds)) + " |")
    for key in ("pairs_per_s", "pairs_per_cpu_s"):
      rounds = "ours: " + " ".join(_fmt(r[key]) for r in ours_rounds)
      if ref_rounds:
        rounds += "; reference: " + " ".join(_fmt(r[key], 1) for r in ref_rounds)
      print(f"<!-- {key} by round, {rounds} -->")
    if args.workers:
      it = pipelines.make_iterator(ours.ds, num_workers=args.workers)
      next(it)
      rate = _pipeline_rates(it, args.batches, args.batch)["pairs_per_s"]
      it.close()
      print(f"|   | {args.workers} worker processes: {rate:.0f} pairs/s "
            "in all |" + " |" * 8)


def _row(patch: int, ours: list[dict], ref: list[dict]) -> list[str]:
  """One table row; the reference's cells are dashes when it was not run."""
  med = lambda rows, k: statistics.median(row[k] for row in rows)
  cells = [str(patch), _fmt(med(ours, "sampling_ms"), 3),
           _fmt(med(ref, "sampling_ms"), 3) if ref else "–",
           _fmt(med(ours, "recipe_pairs_per_s"))]
  for key in ("pairs_per_s", "pairs_per_cpu_s"):
    if ref:
      s = paired_summary([r[key] for r in ours], [r[key] for r in ref])
      cells += [_fmt(s["ours"]), _fmt(s["reference"], 1), f"{s['ratio']:.1f}x"]
    else:
      cells += [_fmt(med(ours, key)), "–", "–"]
  return cells


def _parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pairs", type=int, default=128,
                 help="pairs per round and side (whole batches)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tile", default="",
                 help="a 256x256 4-band uint8 raster (default: synthetic)")
  p.add_argument("--workers", type=int, default=0,
                 help="also time our pipeline with this many workers")
  p.add_argument("--reference", default="", help="path of T-SS-GLCNet")
  p.add_argument("--torch-python", default="",
                 help="python with torch, torchvision, opencv, scikit-image "
                      "and tifffile for --reference")
  args = p.parse_args(argv)
  for name in ("pairs", "batch", "rounds"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
  if bool(args.reference) != bool(args.torch_python):
    p.error("--reference and --torch-python go together")
  args.batches = max(1, args.pairs // args.batch)
  return args


def main(argv=None) -> None:
  args = _parse(argv)
  try:
    if args.reference:
      check_reference(args.reference)
    run(args)
  except BenchError as e:
    sys.exit(f"bench_pipeline: {e}")


if __name__ == "__main__":
  main()
