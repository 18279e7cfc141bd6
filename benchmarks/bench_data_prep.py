"""Conversion throughput of data_prep: GeoTIFF scenes → TFDS ArrayRecord dataset.

Writes synthetic scenes with rasterio in a temporary folder (smooth fields plus
noise, tiled and DEFLATE-compressed like typical orthophoto GeoTIFFs, or
uncompressed with --no-compress), converts them with 1 and with --workers
reader processes, and reports tiles/s and MB/s (MB = 10**6 bytes of decoded
tile pixels written). Each figure is the best of --repeats runs, since the
development machine is shared and other load only ever slows a run down.
With --beam it also converts the same scenes on Beam's DirectRunner with
--workers worker processes (needs the beam extra).

  python benchmarks/bench_data_prep.py [--scenes 4] [--size 4096] [--bands 4]
      [--dtype uint8] [--tile 256] [--workers 2] [--labels] [--repeats 2] [--beam]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from data_prep.beam_settings import BeamSettings
from data_prep.class_maps import PRESETS
from data_prep.convert import convert


def _write_scenes(folder: Path, args) -> tuple[Path, Path | None]:
  rng = np.random.default_rng(0)
  images, labels = folder / "images", folder / "labels"
  images.mkdir()
  labels.mkdir()
  profile = dict(driver="GTiff", height=args.size, width=args.size, crs="EPSG:32633",
                 tiled=True, blockxsize=256, blockysize=256)
  if not args.no_compress:
    profile["compress"] = "deflate"
  yy, xx = np.mgrid[0:args.size, 0:args.size] / args.size
  colours = np.array(PRESETS["potsdam"].colours, np.uint8)
  for i in range(args.scenes):
    transform = from_origin(360000.0 + i * args.size * 0.05, 5800000.0, 0.05, 0.05)
    field = np.sin(6 * xx + i) * np.cos(4 * yy - i)
    bands = [field * (b + 1) + rng.normal(0, 0.2, field.shape) for b in range(args.bands)]
    pixels = np.stack(bands)
    if args.dtype == "uint8":
      pixels = np.clip(pixels * 40 + 128, 0, 255).astype(np.uint8)
    elif args.dtype == "uint16":
      pixels = np.clip(pixels * 4000 + 20000, 0, 65535).astype(np.uint16)
    else:
      pixels = pixels.astype(np.float32)
    with rasterio.open(images / f"scene_{i}.tif", "w", count=args.bands, dtype=args.dtype,
                       transform=transform, **profile) as f:
      f.write(pixels)
    classes = np.digitize(field, np.linspace(-1, 1, len(colours) + 1)[1:-1])
    with rasterio.open(labels / f"scene_{i}.tif", "w", count=3, dtype="uint8",
                       transform=transform, **profile) as f:
      f.write(np.moveaxis(colours[classes], -1, 0))
  return images, labels if args.labels else None


def _best_run(images, labels, out: Path, workers: int, args, beam: BeamSettings | None = None) -> float:
  best = float("inf")
  for _ in range(args.repeats):
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    convert(str(images), out, str(labels) if labels else None, tile=args.tile, workers=workers,
            class_map="potsdam" if labels else None, progress=False, beam=beam)
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--scenes", type=int, default=4)
  p.add_argument("--size", type=int, default=4096, help="scene side in pixels")
  p.add_argument("--bands", type=int, default=4)
  p.add_argument("--dtype", default="uint8", choices=("uint8", "uint16", "float32"))
  p.add_argument("--tile", type=int, default=256)
  p.add_argument("--workers", type=int, default=2)
  p.add_argument("--labels", action="store_true", help="also convert RGB colour labels (Potsdam colours)")
  p.add_argument("--no-compress", action="store_true")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--beam", action="store_true",
                 help="also convert on Beam's DirectRunner (--workers processes)")
  args = p.parse_args()

  with tempfile.TemporaryDirectory(prefix="bench_data_prep_") as tmp:
    images, labels = _write_scenes(Path(tmp), args)
    tiles = args.scenes * (-(-args.size // args.tile)) ** 2
    tile_bytes = args.tile ** 2 * (args.bands * np.dtype(args.dtype).itemsize + (1 if labels else 0))
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{args.scenes} scene{'' if args.scenes == 1 else 's'} "
          f"{args.size}x{args.size}x{args.bands} {args.dtype}"
          f"{' + colour labels' if labels else ''}, "
          f"{'uncompressed' if args.no_compress else 'deflate'}; {tiles} tiles of {args.tile}")
    print("path                        workers  seconds  tiles/s   MB/s")
    runs = [("local", workers, None) for workers in sorted({1, args.workers})]
    if args.beam:
      runs.append(("beam DirectRunner", args.workers, BeamSettings("DirectRunner", (
          f"direct_num_workers={args.workers}", "direct_running_mode=multi_processing"))))
    for name, workers, beam in runs:
      seconds = _best_run(images, labels, Path(tmp) / "out", workers, args, beam)
      print(f"{name:26s}  {workers:7d}  {seconds:7.2f}  {tiles / seconds:7.1f}  "
            f"{tiles * tile_bytes / seconds / 1e6:5.1f}")


if __name__ == "__main__":
  main()
