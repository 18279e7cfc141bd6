"""Self-supervised pretraining of one method (GLCNet, its ablations, or a baseline).

Config keys (configs/pretrain.py):
  method, seed
  data.path, data.split, data.batch_size (global), data.num_workers, data.norm
  input: the method's data recipe overrides (glc_jax/data/recipes.py)
  model, loss: see glc_jax/methods; optimizer: see glc_jax/optim
  epochs, num_steps (0 = epochs × steps per epoch), log_every,
  checkpoint_every, keep_checkpoints, keep_best_loss (also keep the epoch with
  the lowest mean loss in best_loss/, which fine-tuning's
  init.checkpoint="best_loss" starts from: the reference's choice)
  probe: the online segmentation probe (glc_jax/stages/probe.py, docs/probe.md)
"""
from __future__ import annotations

import jax
import ml_collections

from glc_jax import methods, optim, parallel
from glc_jax.data import pipelines, source as source_lib
from glc_jax.stages import loop, probe as probe_lib, run_dir, setup


# Minimum of each count key; epochs only counts when num_steps is 0.
COUNTS = {"num_steps": 0, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1,
          "data.num_workers": 0}


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  setup.check_choices(config)  # also when called without train.py (the benchmark)
  setup.check_counts(config, COUNTS if config.num_steps else dict(COUNTS, epochs=1))
  source, info = setup.open_split(config.data.path, config.data.split)
  setup.check_norm(config.data.norm, info)
  mesh = parallel.make_data_mesh()
  global_batch = setup.checked_batch(config.data.batch_size, mesh, len(source), info=info)
  method = methods.create_method(config)
  permutations = None
  if config.method == "jigsaw":
    # The model's class count and the recipe's permutation set must agree.
    tiles = config.input.get("grid", 3) ** 2
    try:
      permutations = pipelines.jigsaw_permutation_set(
          config.input.get("permutations", ""), config.model.get("num_permutations", 1000), tiles)
    except ValueError as e:
      # Without a file the set is generated, and only its size can be wrong.
      key = "input.permutations" if config.input.get("permutations") else "model.num_permutations"
      raise setup.ConfigError(f"{key}: {e}") from None
  example_fn = pipelines.recipe_for(
      pipelines.recipe_name(config.method), config.input, permutations=permutations,
      dataset=pipelines.dataset_data_config(info, norm_mode=config.data.norm))
  dataset = pipelines.train_dataset(
      source, example_fn, batch_size=global_batch // jax.process_count(), seed=config.seed,
      epoch_arrays=pipelines.epoch_arrays_for(pipelines.recipe_name(config.method), config.input))

  steps_per_epoch = len(source) // global_batch
  total_steps = config.num_steps or config.epochs * steps_per_epoch
  warmup = config.optimizer.get("warmup_epochs", 0) * steps_per_epoch
  if warmup >= total_steps:  # the schedule counts whole epochs; num_steps may end inside one
    raise setup.ConfigError(f"config key optimizer.warmup_epochs is "
                            f"{config.optimizer.warmup_epochs}, {warmup:g} steps at "
                            f"{steps_per_epoch} per epoch; the warm-up must be shorter than the "
                            f"run (steps: {total_steps})")
  try:
    tx, schedule = optim.build_optimizer(
        config.optimizer, steps_per_epoch=steps_per_epoch,
        num_epochs=-(-total_steps // steps_per_epoch), num_devices=parallel.data_size(mesh),
        global_batch=global_batch)
  except ValueError as e:  # a schedule the run's length cannot hold
    raise setup.ConfigError(str(e)) from None
  rng = jax.random.key(config.seed)
  probe = probe_lib.build(config, mesh, rng)
  with run_dir.claim(workdir, config, source_lib.content_id(info.metadata), total_steps) as claim:
    state = methods.init_train_state(method, tx, mesh, jax.random.fold_in(rng, 0),
                                     setup.example_shapes(dataset))
    train_step = methods.make_train_step(method, tx, schedule, mesh)
    iterator = pipelines.make_iterator(dataset, num_workers=config.data.num_workers,
                                       sharding=parallel.batch_sharding(mesh))
    desc = f"pretrain {config.method}"
    claim.record_config(desc)
    _, checkpoints = loop.fit(
        state, train_step, iterator, jax.random.fold_in(rng, 1), workdir=workdir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every, items_per_step=global_batch, desc=desc,
        keep_best_loss=config.get("keep_best_loss", False), probe=probe)
    checkpoints.close()
    if probe is not None:
      probe_lib.write_history(workdir, probe.history)
