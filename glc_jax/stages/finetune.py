"""Fine-tuning DeepLabv3+ on a labelled (subset of a) split, with model selection on validation.

Config keys (configs/finetune.py):
  seed; data.path, data.split, data.label_fraction (a stored subset, or None
  for all), data.val_split (model selection; keep it apart from the reported
  test split), data.batch_size (global), data.num_workers, data.norm
  init.kind: 'random' | 'checkpoint' (a pretraining run's workdir, or a
  checkpoint from glc_jax.tools.import_torch, e.g. ImageNet ResNet weights);
  init.path; init.transfer: 'backbone' | 'backbone+encoder' | 'all';
  init.checkpoint: 'latest' (a pretraining run's last state) | 'best_loss'
  (its epoch with the lowest mean loss, kept by keep_best_loss: the reference's)
  input: fine-tuning augmentation overrides (glc_jax/data/recipes.py FinetuneConfig)
  model: depth, output_stride, width, dtype; optimizer: see glc_jax/optim
  epochs, log_every, checkpoint_every, keep_checkpoints, select_metric
  validate_every_epochs: validate (and offer the state to best/) every this many
  epochs and at the last step; 1 = every epoch (the reference)
  early_stopping.patience: stop after this many validations without a new best
  select_metric; 0 = train all epochs (the reference)

Besides checkpoints and logs the run leaves best_step.json: where its best
validation step fell in the steps it ran (write_best_step).
"""
from __future__ import annotations

import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from glc_jax import checkpoint, files, methods, metrics, models, optim, parallel
from glc_jax.data import pipelines, source as source_lib
from glc_jax.methods.segmentation import SegmentationMethod
from glc_jax.parallel import DATA_AXIS
from glc_jax.stages import loop, run_dir, setup

INIT_KINDS = ("random", "checkpoint")
INIT_CHECKPOINTS = ("latest", checkpoint.BEST_LOSS_DIR)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> models.DeepLabV3Plus:
  try:
    return models.DeepLabV3Plus(num_classes=num_classes, **methods.model_kwargs(config))
  except ValueError as e:
    raise setup.ConfigError(str(e)) from None


def load_pretrained(config: ml_collections.ConfigDict, num_bands: int) -> dict | None:
  """The variables `config.init` starts from (host arrays; None for random init).

  Checked against the dataset's band count and init.path's run (model size, normalisation)
  here, before any compute.
  """
  if config.init.kind not in INIT_KINDS:
    raise setup.ConfigError(f"config key init.kind is {config.init.kind!r}; expected one of {INIT_KINDS}")
  if config.init.kind == "random":
    if config.init.path:
      raise setup.ConfigError(f"config key init.path is {config.init.path!r} but init.kind is 'random', "
                              "which loads nothing; clear init.path or use configs/finetune.py:checkpoint")
    return None
  if not config.init.path:
    raise setup.ConfigError("config key init.path is empty: set it to a pretraining run's workdir "
                            "or an imported checkpoint, or use configs/finetune.py:random")
  if config.init.transfer not in models.TRANSFER_MODES:
    raise setup.ConfigError(f"config key init.transfer is {config.init.transfer!r}; "
                            f"expected one of {models.TRANSFER_MODES}")
  which = config.init.get("checkpoint", "latest")
  if which not in INIT_CHECKPOINTS:
    raise setup.ConfigError(f"config key init.checkpoint is {which!r}; expected one of "
                            f"{INIT_CHECKPOINTS}")
  init_run = run_dir.run_config_of(config.init.path, "init.path")
  for key in ("depth", "width"):
    # Checked by name: the transfer would only report the first leaf of another shape.
    theirs = (init_run.get("model") or {}).get(key)
    if theirs is not None and theirs != config.model[key]:
      raise setup.ConfigError(f"init.path: {config.init.path} was pretrained with model.{key} "
                              f"{theirs}, this run has {config.model[key]}; set model.{key}={theirs} "
                              "(a ',tiny' pretraining needs the ',tiny' fine-tuning config)")
  trained = (init_run.get("data") or {}).get("norm")
  if trained and trained != config.data.norm:
    raise setup.ConfigError(f"data.norm is {config.data.norm!r}, but {config.init.path} was "
                            f"trained on inputs normalised with {trained!r}; set data.norm={trained} "
                            "so that its features see inputs like those they were learnt on")
  try:
    pretrained = checkpoint.load_variables(config.init.path, which)
  except (FileNotFoundError, checkpoint.CheckpointError) as e:
    raise setup.ConfigError(f"init.path: {e}") from None
  stem = pretrained["params"].get("backbone", {}).get("conv1", {}).get("kernel")
  if stem is not None and np.shape(stem)[-2] != num_bands:
    raise setup.ConfigError(f"init.path: band count does not match: {config.init.path} takes "
                            f"{np.shape(stem)[-2]} bands (backbone/conv1/kernel {np.shape(stem)}), "
                            f"data.path has {num_bands}")
  return pretrained


def initial_variables(config: ml_collections.ConfigDict, fresh: dict,
                      pretrained: dict | None) -> tuple[dict, list[str]]:
  """Fresh variables with `pretrained` (load_pretrained) copied in as `config.init.transfer` says."""
  if pretrained is None:
    return fresh, []
  try:
    return models.transfer_pretrained(fresh, pretrained, mode=config.init.transfer)
  except ValueError as e:
    raise setup.ConfigError(f"init.path: {e}") from None


def make_confusion_step(model, mesh: jax.sharding.Mesh, num_classes: int, ignore_index: int = 255):
  """Jitted (variables, batch) -> (K, K) int32 confusion matrix of the global batch.

  batch: image (B, H, W, C), label (B, H, W), valid (B,) bool (padding rows
  are False and do not count), sharded over DATA_AXIS; variables replicated.
  """
  def step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    label = jnp.where(batch["valid"][:, None, None], batch["label"], ignore_index)
    return metrics.confusion_matrix_jnp(label, jnp.argmax(logits, -1), num_classes, ignore_index,
                                        axis_name=DATA_AXIS)

  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC),
                               out_specs=parallel.REPLICATED_SPEC))


def make_validator(model, mesh, source, info, batch_size: int, data_config, prefix: str = "val"):
  """state -> {'<prefix>_oa', '<prefix>_kappa', '<prefix>_miou'} over every tile of `source`.

  state: anything with params and batch_stats of `model`; batch_size: global.
  """
  confusion_step = make_confusion_step(model, mesh, info.num_classes, info.ignore_index)
  dataset = pipelines.eval_dataset(source, batch_size=batch_size // jax.process_count(),
                                   config={"norm": data_config["norm"]})

  def validate(state) -> dict[str, float]:
    total = np.zeros((info.num_classes,) * 2, np.int64)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    for batch in pipelines.make_iterator(dataset, sharding=parallel.batch_sharding(mesh)):
      total += np.asarray(jax.device_get(confusion_step(variables, batch)), np.int64)
    scores = metrics.compute_scores(total, info.class_names)
    return {f"{prefix}_oa": scores.overall_accuracy, f"{prefix}_kappa": scores.kappa,
            f"{prefix}_miou": scores.miou}

  return validate


COUNTS = {"epochs": 1, "log_every": 1, "checkpoint_every": 1, "keep_checkpoints": 1,
          "data.num_workers": 0, "early_stopping.patience": 0, "validate_every_epochs": 1}
BEST_STEP_FILE = "best_step.json"


def write_best_step(workdir: str | os.PathLike, checkpoints: checkpoint.RunCheckpoints,
                    planned_steps: int, steps_per_epoch: int, validate_every_steps: int) -> None:
  """<workdir>/best_step.json, written whole or not at all, from a finished fit's checkpoints.

  {'select_metric', 'best_step', 'best_value', 'stopped_step', 'planned_steps',
  'steps_per_epoch', 'validate_every_steps'}: best_step == stopped_step means the best state is the last
  one validated, so more steps might still have improved it.
  """
  if jax.process_index() != 0:
    return
  best = checkpoints.best_metrics()
  record = {"select_metric": checkpoints.best_metric, "best_step": checkpoints.best_step(),
            "best_value": None if best is None else best[checkpoints.best_metric],
            "stopped_step": checkpoints.latest_step(), "planned_steps": planned_steps,
            "steps_per_epoch": steps_per_epoch, "validate_every_steps": validate_every_steps}
  files.write_text_atomic(pathlib.Path(workdir) / BEST_STEP_FILE, json.dumps(record, indent=1) + "\n")


def read_best_step(workdir: str | os.PathLike) -> dict | None:
  """What write_best_step wrote (None when the run has not finished)."""
  path = pathlib.Path(workdir) / BEST_STEP_FILE
  return json.loads(path.read_text()) if path.exists() else None


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  setup.check_choices(config)  # also when called without train.py (the benchmark)
  setup.check_counts(config, COUNTS)
  source, info = setup.open_split(config.data.path, config.data.split, config.data.label_fraction)
  setup.check_norm(config.data.norm, info)
  if not info.labelled:
    raise setup.ConfigError(f"data.path: {config.data.path} has no labels; fine-tuning needs labels")
  setup.check_labelled_pixels(source, info, "data.split", "fine-tuning would learn nothing: check "
                              "the conversion's --ignore-colour and --unknown-to-ignore, or raise "
                              "data.label_fraction")
  if config.data.val_split == config.data.split:
    raise setup.ConfigError("data.val_split must differ from data.split (model selection needs held-out data)")
  val_source, val_info = setup.open_split(config.data.path, config.data.val_split,
                                          split_key="data.val_split")
  setup.check_labelled_pixels(val_source, val_info, "data.val_split", "model selection needs labels")
  if config.select_metric not in ("val_oa", "val_kappa", "val_miou"):
    raise setup.ConfigError(f"config key select_metric is {config.select_metric!r}; "
                            "expected val_oa, val_kappa or val_miou")
  # A run with a periodic checkpoint resumes from it and needs nothing from init.path, which
  # may have moved since (a best/ state alone does not resume: the run starts from init).
  resuming = checkpoint.saved_steps(pathlib.Path(workdir).absolute() / "checkpoints")
  pretrained = None if resuming else load_pretrained(config, info.num_bands)
  mesh = parallel.make_data_mesh()
  global_batch = setup.checked_batch(config.data.batch_size, mesh, len(source), info=info)
  model = build_model(config, info.num_classes)
  method = SegmentationMethod(model=model, ignore_index=info.ignore_index)
  data_config = pipelines.dataset_data_config(info, norm_mode=config.data.norm)
  example_fn = pipelines.recipe_for("finetune", config.input, dataset=data_config)
  dataset = pipelines.train_dataset(source, example_fn,
                                    batch_size=global_batch // jax.process_count(), seed=config.seed)

  steps_per_epoch = len(source) // global_batch
  total_steps = config.epochs * steps_per_epoch
  validate_every = config.validate_every_epochs * steps_per_epoch
  try:
    tx, schedule = optim.build_optimizer(config.optimizer, steps_per_epoch=steps_per_epoch,
                                         num_epochs=config.epochs,
                                         num_devices=parallel.data_size(mesh), global_batch=global_batch)
  except ValueError as e:  # a schedule the run's length cannot hold
    raise setup.ConfigError(str(e)) from None
  with run_dir.claim(workdir, config, source_lib.content_id(info.metadata), total_steps) as claim:
    rng = jax.random.key(config.seed)
    state = methods.init_train_state(method, tx, mesh, jax.random.fold_in(rng, 0),
                                     setup.example_shapes(dataset))
    variables, copied = initial_variables(
        config, {"params": state.params, "batch_stats": state.batch_stats}, pretrained)
    if copied:
      which = config.init.get("checkpoint", "latest")
      print(f"finetune: {len(copied)} tensors initialised from {config.init.path} "
            f"({config.init.transfer}{', its best_loss epoch' if which != 'latest' else ''})")
    variables = parallel.replicate(jax.device_get(variables), mesh)
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])

    train_step = methods.make_train_step(method, tx, schedule, mesh)
    iterator = pipelines.make_iterator(dataset, num_workers=config.data.num_workers,
                                       sharding=parallel.batch_sharding(mesh))
    validate = make_validator(model, mesh, val_source, info, config.data.batch_size, data_config)
    claim.record_config("finetune")
    _, checkpoints = loop.fit(
        state, train_step, iterator, jax.random.fold_in(rng, 1), workdir=workdir,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        log_every=config.log_every, items_per_step=global_batch, desc="finetune",
        validate=validate, best_metric=config.select_metric,
        patience=config.early_stopping.patience, validate_every=validate_every)
    write_best_step(workdir, checkpoints, total_steps, steps_per_epoch, validate_every)
    checkpoints.close()
