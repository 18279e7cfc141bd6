"""Grain input pipelines: source -> shard -> shuffle -> augment -> batch -> devices.

Build a pipeline in two steps:

  ds = train_dataset(source, example_fn, batch_size=..., seed=...)
  it = make_iterator(ds, num_workers=..., sharding=...)   # grain DatasetIterator

`example_fn(record, rng)` is one of the recipes in `glc_jax.data.recipes`
bound to its config (`recipe_for(method, config)` does the binding). Batches
are dicts of numpy arrays (or global jax.Arrays when `sharding` is given)
following the batch contract:

  glcnet:      view1, view2 (B, n, n, C) float32; patch_boxes1, patch_boxes2
               (B, P, 4) int32 half-open (y0, x0, y1, x1); patch_valid (B, P) bool
  simclr/mocov2: view1, view2
  inpainting:  image (B, n, n, C) float32; mask (B, n, n) bool (True = erased)
  jigsaw:      tiles (B, 9, t, t, C) float32; perm_index (B,) int32
  finetune:    image (B, S, S, C) float32; label (B, S, S) int32 (255 = ignore)
  eval:        image, label of whole tiles, plus valid (B,) bool (False on the
               padding that completes the last batch)

Determinism: every random choice comes from Grain's per-element generator of
the batch, seeded by (seed, batch position in the per-process shuffled,
repeated stream), and batches are formed before the iterator, so the stream
is the same for any number of worker processes. The iterator returned by `make_iterator` is a
Grain DatasetIterator: `get_state()`/`set_state()` (or Orbax with
`grain.checkpoint.CheckpointSave/CheckpointRestore`) restore it exactly,
including through the host and device prefetch buffers.

Sharding across processes: process i of `count` reads the contiguous block
`[i * (N // count), (i + 1) * (N // count))` of the source (training drops
the N % count remainder so every process runs the same number of steps);
evaluation keeps every record and pads instead (`shard_indices`).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import grain
import numpy as np

from glc_jax.data import augment, patches, recipes

ExampleFn = Callable[[Mapping[str, Any], np.random.Generator], dict]
EpochFn = Callable[[np.random.Generator, int], dict]
# Keeps the per-epoch generators apart from the shuffling ones seeded by (seed, epoch).
_PER_EPOCH_STREAM = 1


def _process(process_index: int | None, process_count: int | None):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in "
                     f"[0, {process_count})")
  return process_index, process_count


def shard_indices(num_records: int, process_index: int, process_count: int,
                  drop_remainder: bool) -> range:
  """Source indices read by one process: a contiguous block.

  With drop_remainder every process gets exactly num_records // count
  records; otherwise the first num_records % count processes get one more.
  """
  if drop_remainder:
    per = num_records // process_count
    return range(process_index * per, (process_index + 1) * per)
  base, extra = divmod(num_records, process_count)
  start = process_index * base + min(process_index, extra)
  return range(start, start + base + (process_index < extra))


RECIPE_CONFIGS = {
    "glcnet": recipes.TwoViewConfig,
    "simclr": recipes.TwoViewConfig,
    "mocov2": recipes.TwoViewConfig,
    "inpainting": recipes.InpaintingConfig,
    "jigsaw": recipes.JigsawConfig,
    "finetune": recipes.FinetuneConfig,
}


def _placed(cls, keys: Mapping[str, Any]) -> dict:
  """`keys` put wherever config dataclass `cls` has a field of that name,
  at the top level or in a nested config (jigsaw's `augment`)."""
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in keys:
      out[field.name] = keys[field.name]
    elif dataclasses.is_dataclass(field.default):
      nested = _placed(type(field.default), keys)
      if nested:
        out[field.name] = nested
  return out


def _merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict:
  out = dict(base)
  for key, value in override.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      value = _merged(out[key], value)
    out[key] = value
  return out


def recipe_name(method: str) -> str:
  """The input recipe of a pretraining method: GLCNet's ablations take GLCNet's input."""
  return "glcnet" if method.startswith("glcnet") else method


def recipe_for(method: str, config: Mapping[str, Any] | Any | None = None,
               permutations: np.ndarray | None = None,
               dataset: Mapping[str, Any] | None = None) -> ExampleFn:
  """Binds a method's recipe to its config (a dataclass, mapping or None).

  `config` keys are the fields of the method's config dataclass in
  `glc_jax.data.recipes` (nested mappings for nested dataclasses); unknown
  keys raise. `dataset` holds the keys that come from the dataset
  (`dataset_data_config`: norm, value_max); each goes wherever the method's
  config has a field of that name and is ignored where it has none
  (inpainting does no colour work, so it takes no value_max); keys given in
  `config` win. Jigsaw uses `permutations` (N, grid**2), by default the
  file named by its `permutations` key or else the models' deterministic
  maximal-Hamming set of 1000.
  """
  if method not in RECIPE_CONFIGS:
    raise ValueError(f"unknown input method {method!r} (expected one of "
                     f"{', '.join(RECIPE_CONFIGS)})")
  cls = RECIPE_CONFIGS[method]
  if dataclasses.is_dataclass(config):
    config = dataclasses.asdict(config)
  elif hasattr(config, "to_dict"):  # an ml_collections.ConfigDict, which is no Mapping
    config = config.to_dict()
  values = _merged(_placed(cls, dataset or {}), dict(config or {}))
  cfg = recipes.config_from_dict(cls, values, method)
  if method == "glcnet":
    if cfg.patch_overlap not in patches.OVERLAP_MODES:
      raise ValueError(f"input.patch_overlap = {cfg.patch_overlap!r}; expected one of "
                       f"{patches.OVERLAP_MODES}")
    return functools.partial(recipes.two_view_example, cfg=cfg)
  if method in ("simclr", "mocov2"):
    return functools.partial(recipes.two_view_example,
                             cfg=dataclasses.replace(cfg, patch_num=0))
  if method == "inpainting":
    if cfg.masks not in recipes.MASK_MODES:
      raise ValueError(f"input.masks = {cfg.masks!r}; expected one of {recipes.MASK_MODES}")
    if cfg.masks == "epoch" and cfg.view_size - cfg.block_size < 2:
      raise ValueError(f"input.masks = 'epoch' draws corners below view_size - block_size - 1; "
                       f"view_size {cfg.view_size} leaves none for block_size {cfg.block_size}")
    return functools.partial(recipes.inpainting_example, cfg=cfg)
  if method == "jigsaw":
    if permutations is None:
      permutations = jigsaw_permutation_set(cfg.permutations, None, cfg.grid ** 2)
    if np.shape(permutations)[1:] != (cfg.grid ** 2,):
      raise ValueError(f"jigsaw permutations have shape {np.shape(permutations)}, "
                       f"expected (N, {cfg.grid ** 2})")
    return functools.partial(recipes.jigsaw_example, cfg=cfg,
                             permutations=np.asarray(permutations))
  if cfg.label_warp not in recipes.LABEL_WARPS:
    raise ValueError(f"input.label_warp = {cfg.label_warp!r}; expected one of "
                     f"{recipes.LABEL_WARPS}")
  return functools.partial(recipes.finetune_example, cfg=cfg)


def epoch_arrays_for(method: str, config: Mapping[str, Any] | None = None
                     ) -> EpochFn | None:
  """What `train_dataset` draws once per epoch for this recipe config, or None:
  inpainting's masks with `masks="epoch"` (the reference's)."""
  if method != "inpainting":
    return None
  cfg = recipes.config_from_dict(recipes.InpaintingConfig, config, method)
  return functools.partial(recipes.epoch_masks, cfg=cfg) if cfg.masks == "epoch" else None


def jigsaw_permutation_set(path: str, count: int | None, tiles: int = 9) -> np.ndarray:
  """(count, tiles) int32 jigsaw classes: loaded from the `.npy` file at `path`, or
  (path "") the generated maximal-Hamming set of `count` (1000 when None).

  A loaded set must hold `count` rows (the model's class count) unless count is None.
  """
  from glc_jax.models import permutations as perms_lib  # pylint: disable=g-import-not-at-top
  if not path:
    return perms_lib.jigsaw_permutations(count or 1000, tiles)
  perms = perms_lib.load_permutations(path, tiles)
  if count is not None and len(perms) != count:
    raise ValueError(f"{path} holds {len(perms)} permutations but model.num_permutations = "
                     f"{count}; set them equal")
  return perms


def dataset_data_config(info, norm_mode: str = "reference",
                        stats_split: str = "train") -> dict:
  """Data config keys that come from an opened dataset's metadata.

  Args:
    info: `glc_jax.data.source.DatasetInfo` of any split.
    norm_mode: 'reference' (x/255*3.2-1.6) or 'stats' (the per-band mean and
      std of `stats_split`, by default the training split's, whichever
      split is being read).
  Returns:
    {"norm": {...}, "value_max": float} to merge into a recipe config;
    value_max is 255 for uint8 images, else the largest band maximum.
  """
  norm = {"mode": norm_mode}
  if norm_mode == "stats":
    stats = info.split_band_stats.get(stats_split, info.band_stats)
    norm.update(mean=tuple(float(m) for m in stats.mean),
                std=tuple(float(v) for v in stats.std))
  value_max = (255.0 if info.dtype == "uint8"
               else float(np.max(info.band_stats.max)))
  return {"norm": norm, "value_max": value_max}


def _stack(examples: Sequence[dict]) -> dict:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


class _BatchOf:
  """Applies a recipe to a list of records with one generator per batch.

  Augmenting at the batch level lets recipes that accept `out=` write their
  large arrays straight into the batch (saving a copy of ~1.6 MB per GLCNet
  pair, ~7% of its time); the rest are copied. The generator is Grain's
  per-element one for the batch, so the stream is as deterministic as with
  per-record generators.
  """

  def __init__(self, example_fn: ExampleFn):
    self._fn = example_fn
    try:
      self._writes_into = "out" in inspect.signature(example_fn).parameters
    except (TypeError, ValueError):
      self._writes_into = False

  def __call__(self, records: Sequence[Mapping[str, Any]],
               rng: np.random.Generator) -> dict:
    first = self._fn(records[0], rng)
    batch = {k: np.empty((len(records),) + np.shape(v), np.asarray(v).dtype)
             for k, v in first.items()}
    for k, v in first.items():
      batch[k][0] = v
    for i in range(1, len(records)):
      if self._writes_into:
        example = self._fn(records[i], rng,
                           out={k: batch[k][i] for k in batch})
      else:
        example = self._fn(records[i], rng)
      for k, v in example.items():
        if not np.may_share_memory(v, batch[k][i]):
          batch[k][i] = v
    return batch


class _PerEpoch:
  """Sets a batch's keys to arrays drawn once per epoch: batch i belongs to the
  epoch of its first element and gets that epoch's arrays, drawn from a
  generator seeded by (seed, epoch, process) and cached."""

  def __init__(self, epoch_fn: EpochFn, seed: int, process: int, epoch_length: int,
               batch_size: int):
    self._fn = epoch_fn
    self._seed = seed
    self._process = process
    self._epoch_length = epoch_length
    self._batch_size = batch_size
    self._epoch = -1
    self._arrays = None

  def __call__(self, index: int, batch: dict) -> dict:
    epoch = index * self._batch_size // self._epoch_length
    if epoch != self._epoch:
      rng = np.random.default_rng([self._seed, epoch, self._process, _PER_EPOCH_STREAM])
      self._arrays = self._fn(rng, self._batch_size)
      self._epoch = epoch
    return dict(batch, **{k: v.copy() for k, v in self._arrays.items()})


class _EpochShuffled:
  """A shard of the source repeated for `num_epochs`, reshuffled each epoch.

  Element e * len(shard) + j is record shard[perm_e[j]], perm_e a numpy
  permutation seeded by (seed, e). It replaces Grain's `shuffle().repeat()`,
  whose per-element index_shuffle cost ~0.27 ms on the development machine
  (a third of the whole per-pair budget); one O(N) permutation per epoch,
  kept per process, costs microseconds per record.
  """

  def __init__(self, source, shard: range, seed: int, shuffle: bool,
               num_epochs: int | None):
    self._source = source
    self._shard = shard
    self._seed = seed
    self._shuffle = shuffle
    n = len(shard)
    self._length = n * num_epochs if num_epochs else sys.maxsize - sys.maxsize % n
    self._perm_epoch = -1
    self._perm = None

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    epoch, j = divmod(index, len(self._shard))
    if not self._shuffle:
      return self._source[self._shard[j]]
    if epoch != self._perm_epoch:
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(
          len(self._shard))
      self._perm_epoch = epoch
    return self._source[self._shard[int(self._perm[j])]]


def train_dataset(source: Sequence[Mapping[str, Any]], example_fn: ExampleFn,
                  *, batch_size: int, seed: int, num_epochs: int | None = None,
                  shuffle: bool = True, process_index: int | None = None,
                  process_count: int | None = None,
                  epoch_arrays: EpochFn | None = None) -> grain.MapDataset:
  """Training batches as a Grain MapDataset (batch i is a pure function of i).

  Args:
    source: random-access records (len + getitem), e.g. the TFDS ArrayRecord
      data source from `glc_jax.data.source` or a list of dicts.
    example_fn: record, rng -> example dict (see `recipe_for`).
    batch_size: per-process batch size; the last partial batch of the
      stream is dropped.
    seed: shuffling and augmentation seed (0 .. 2**32-1).
    num_epochs: None repeats forever; each epoch is reshuffled and
      re-augmented.
    process_index, process_count: this process's shard (default: jax's).
    epoch_arrays: (rng, batch_size) -> arrays that every batch of an epoch
      shares, drawn once per epoch and process (`epoch_arrays_for`).

  Returns:
    MapDataset of batches (dicts of stacked numpy arrays).
  """
  index, count = _process(process_index, process_count)
  shard = shard_indices(len(source), index, count, drop_remainder=True)
  if len(shard) < batch_size:
    raise ValueError(f"process {index} has {len(shard)} records, fewer than "
                     f"one batch of {batch_size}")
  ds = grain.MapDataset.source(
      _EpochShuffled(source, shard, seed, shuffle, num_epochs))
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=list)
  ds = ds.random_map(_BatchOf(example_fn), seed=seed)
  if epoch_arrays is not None:
    ds = ds.map_with_index(_PerEpoch(epoch_arrays, seed, index, len(shard), batch_size))
  return ds


class _PaddedShard:
  """One process's eval shard padded to a whole number of batches."""

  def __init__(self, source, indices: range, length: int):
    self._source = source
    self._indices = indices
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int):
    valid = i < len(self._indices)
    record = self._source[self._indices[i if valid else 0]]
    return dict(record), valid


def eval_dataset(source: Sequence[Mapping[str, Any]], *, batch_size: int,
                 config: Mapping[str, Any] | recipes.EvalConfig | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> grain.MapDataset:
  """Whole tiles in source order, no augmentation, every record once.

  Each process gets its contiguous block, padded (with copies of its first
  record, `valid` False) so that all processes yield the same number of
  full batches. Batches: image, label (if labelled), valid (B,) bool.
  """
  cfg = recipes.config_from_dict(recipes.EvalConfig, config, "eval")
  index, count = _process(process_index, process_count)
  per_max = -(-len(source) // count)
  padded = -(-per_max // batch_size) * batch_size
  shard = shard_indices(len(source), index, count, drop_remainder=False)
  if not len(shard):
    raise ValueError(f"process {index} has no evaluation records")

  def example(item):
    record, valid = item
    out = recipes.eval_example(record, cfg)
    out["valid"] = np.bool_(valid)
    return out

  ds = grain.MapDataset.source(_PaddedShard(source, shard, padded))
  return ds.map(example).batch(batch_size, drop_remainder=True,
                               batch_fn=_stack)


def _worker_init(worker_index: int, worker_count: int, parent: int) -> None:
  del worker_index, worker_count
  # A Ctrl-C reaches the whole process group: the parent stops the run (and so
  # its workers) and says so in one line; a worker's own traceback would bury it.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  augment.tune_allocator()
  _exit_with_parent(parent)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
  """Ends this worker process once `parent` (the pid that started it) is gone.

  A parent killed with SIGKILL (or by the OOM killer) cannot stop its Grain
  workers, which would otherwise live on holding memory and shared buffers.
  The pid comes from the parent itself: a worker takes seconds to start
  (spawn imports the main module), and one whose parent died meanwhile has
  already been re-parented, so its own getppid() would name the new parent.
  Not prctl(PR_SET_PDEATHSIG): Grain starts workers from helper threads, and
  that signal fires when the starting thread ends, not the process.
  """

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def release_batches() -> None:
  """Frees the batches this process still holds and waits until their worker
  shared memory is unlinked: for an exit that skips the interpreter's teardown
  (cli.exit_with after a Ctrl-C), which would leave the unlinking to the
  resource tracker and its "leaked shared_memory" warning. Reference cycles
  hold some batches, and Grain unlinks on a thread pool of its own.
  """
  gc.collect()
  arrays = grain.multiprocessing.SharedMemoryArray
  pool = getattr(arrays, "_del_thread_pool", None)
  if pool is not None:
    pool.close()
    pool.join()
    arrays._del_thread_pool = None  # pylint: disable=protected-access  # later ones unlink inline


def _to_global(batch: dict, sharding) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items()}


def make_iterator(ds: grain.MapDataset, *, num_workers: int = 0,
                  worker_buffer: int = 2, read_threads: int = 0,
                  read_buffer: int = 2, sharding=None, host_buffer: int = 2,
                  device_buffer: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator over `ds`, optionally onto devices.

  Args:
    ds: a MapDataset of batches (`train_dataset`, `eval_dataset`).
    num_workers: augmentation worker processes (0: in this process). The
      output does not depend on it.
    worker_buffer: batches buffered per worker.
    read_threads, read_buffer: Grain ReadOptions in each process (threads
      share the GIL, so workers are the way to scale augmentation).
    sharding: a jax.sharding.Sharding for the batch axis (e.g.
      NamedSharding(mesh, P("data"))); batches then become global
      jax.Arrays via make_array_from_process_local_data, prefetched
      `device_buffer` deep after a `host_buffer`-deep host queue.

  Returns:
    grain.DatasetIterator; `get_state`/`set_state` give exact resume.
  """
  it_ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=read_buffer))
  if num_workers > 0:
    # Grain's worker pool reads absl flags; a program that never parsed them
    # (a notebook, a benchmark) gets their defaults instead of a crash.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers,
                                     per_worker_buffer_size=worker_buffer),
        worker_init_fn=functools.partial(_worker_init, parent=os.getpid()))
  else:
    augment.tune_allocator()
  if sharding is not None:
    prefetch = grain.experimental.ThreadPrefetchIterDataset
    it_ds = prefetch(it_ds, prefetch_buffer_size=host_buffer)
    it_ds = it_ds.map(functools.partial(_to_global, sharding=sharding))
    it_ds = prefetch(it_ds, prefetch_buffer_size=device_buffer)
  return iter(it_ds)
