"""Throughput of the GLCNet pretraining input on the host, beside the reference.

Measures, for 224x224 views of 256x256 4-band uint8 tiles with 4 patches of
48 and of 16 pixels:
  * matched-patch sampling alone (ms per pair),
  * one pair through the recipe (crop, views, augmentation, patches),
  * the full Grain pipeline in this process (batching included), pairs/s,
all on ONE core (the reference's figures in SPEC section 2 are per core).
Each figure is the best of --repeats runs, since the development machine is
shared and other load only ever slows a run down.

  python benchmarks/bench_pipeline.py [--pairs 400] [--batch 32] [--workers 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from glc_jax.data import augment, pipelines, recipes
from glc_jax.data.patches import ViewGeometry, sample_matched_patches

# SPEC section 2: the reference on the 2-core development machine, one core.
REFERENCE_PAIRS_PER_S = {48: 75.0, 16: 50.0}
REFERENCE_SAMPLING_MS = {48: 9.0, 16: 15.0}


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


def _per_item_seconds(fn, items, repeats: int) -> float:
  fn(items[0])
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    for item in items:
      fn(item)
    best = min(best, (time.perf_counter() - start) / len(items))
  return best


def _pipeline_rate(it, batches: int, batch: int, repeats: int) -> float:
  next(it)
  best = 0.0
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    best = max(best, batches * batch / (time.perf_counter() - start))
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pairs", type=int, default=400)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--workers", type=int, default=0,
                      help="also time the pipeline with this many workers")
  args = parser.parse_args()
  augment.tune_allocator()
  rng = np.random.default_rng(0)
  tiles = [{"image": rng.integers(0, 256, (256, 256, 4), dtype=np.uint8)}
           for _ in range(64)]
  print(f"# bench_pipeline  {platform.node()}  {os.cpu_count()} cpus  "
        f"{time.strftime('%Y-%m-%d')}  numpy {np.__version__}")
  print("| patch | sampling ms/pair (ref) | speed-up | recipe pairs/s | "
        "Grain pipeline pairs/s/core (ref) | speed-up |")
  print("|---|---|---|---|---|---|")
  for patch in (48, 16):
    cfg = recipes.TwoViewConfig(patch_size=patch, patch_num=4)
    geos = _geometries(rng, cfg, args.pairs)
    sample_s = _per_item_seconds(
        lambda g: sample_matched_patches(rng, g[0], g[1], patch, 4), geos,
        args.repeats)
    records = [tiles[i % len(tiles)] for i in range(args.pairs)]
    recipe_s = _per_item_seconds(
        lambda r: recipes.two_view_example(r, rng, cfg), records, args.repeats)
    ds = pipelines.train_dataset(
        tiles, pipelines.recipe_for("glcnet", cfg), batch_size=args.batch,
        seed=0, process_index=0, process_count=1)
    batches = max(1, args.pairs // args.batch)
    pipe_rate = _pipeline_rate(pipelines.make_iterator(ds), batches,
                               args.batch, args.repeats)
    print(f"| {patch} | {sample_s * 1e3:.3f} ({REFERENCE_SAMPLING_MS[patch]:.0f})"
          f" | {REFERENCE_SAMPLING_MS[patch] / (sample_s * 1e3):.0f}x"
          f" | {1 / recipe_s:.0f} | {pipe_rate:.0f} "
          f"({REFERENCE_PAIRS_PER_S[patch]:.0f})"
          f" | {pipe_rate / REFERENCE_PAIRS_PER_S[patch]:.1f}x |")
    if args.workers:
      it = pipelines.make_iterator(ds, num_workers=args.workers)
      rate = _pipeline_rate(it, batches, args.batch, args.repeats)
      it.close()
      print(f"|   | {args.workers} worker processes: {rate:.0f} pairs/s "
            "in all | | | | |")


if __name__ == "__main__":
  main()
