"""The online segmentation probe of a pretraining run: how good the features are, while it runs.

Every `probe.every_steps` steps and at the last step, the pretraining state's
backbone and encoder are frozen (eval mode, running BatchNorm statistics), a
light head (glc_jax/models/probe.py: 'linear' 1×1 conv or the fine-tuning
'decoder') is fitted on their features of a labelled subset and scored on a
held-out split with the fine-tuning validator (one global confusion matrix):
probe_oa, probe_kappa, probe_miou, logged with the step's metrics.

The probe reads the pretraining state and writes nothing into it: the
pretraining params, BatchNorm statistics, optimiser state, extras, data
iterator and RNG stream are bitwise those of a run without it. Its RNG stream
is the run's key folded with RNG_STREAM (0 initialises the model, 1 drives the
training steps). Every probe starts from the same head initialisation and
fits `probe.steps` Adam steps cycling through the subset's batches in order,
so its score depends only on the state it probes. The history of scores is
saved with each checkpoint and restored on resume (glc_jax/checkpoint.py), and
written to `<workdir>/probe.json` when the run ends.

Config keys (`probe.*`, configs/pretrain.py):
  enabled       run the probe.
  every_steps   interval in pretraining steps (the last step is always probed).
  split, fraction  the labelled subset the head is fitted on: a stored subset
                fraction of that split (data_prep's 0.01, 0.05, ...), or None
                for the whole split.
  eval_split, eval_fraction  where it is scored (a different split; None =
                every tile).
  head          'linear' | 'decoder'.
  steps, lr     Adam steps of the head and their learning rate (constant, no
                weight decay).
  batch_size    global batch of feature extraction, head steps and scoring.
"""
from __future__ import annotations

import json
import os
import pathlib
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from glc_jax import files, methods, optim, parallel
from glc_jax.data import pipelines
from glc_jax.methods.probe import ProbeHeadMethod
from glc_jax.models.probe import PROBE_HEADS, ProbeSegmenter
from glc_jax.stages import finetune, setup

RNG_STREAM = 2
HISTORY_FILE = "probe.json"
SCORES = ("probe_oa", "probe_kappa", "probe_miou")
COUNTS = {"probe.every_steps": 1, "probe.steps": 1, "probe.batch_size": 1}
FROZEN = ("backbone", "encoder")


class OnlineProbe:
  """Fits and scores the probe head on a pretraining state; keeps the history of scores.

  Args:
    config: the pretraining config (its probe.*, data.path, data.norm and
      model.* keys are read).
    mesh: the run's data mesh.
    rng: the probe's key (the run's key folded with RNG_STREAM).
  Raises setup.ConfigError naming the key of a value that cannot work.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rng: jax.Array):
    cfg = config.probe
    setup.check_counts(config, COUNTS)
    if cfg.head not in PROBE_HEADS:
      raise setup.ConfigError(f"config key probe.head is {cfg.head!r}; expected one of {PROBE_HEADS}")
    if isinstance(cfg.lr, bool) or not isinstance(cfg.lr, (int, float)) or not cfg.lr > 0:
      raise setup.ConfigError(f"config key probe.lr is {cfg.lr!r}; expected a positive number")
    if cfg.eval_split == cfg.split:
      raise setup.ConfigError(f"probe.eval_split must differ from probe.split ({cfg.split!r}): the "
                              "probe is scored on held-out tiles")
    fit_source, info = setup.open_split(config.data.path, cfg.split, cfg.fraction,
                                        split_key="probe.split", fraction_key="probe.fraction")
    if not info.labelled:
      raise setup.ConfigError(f"data.path: {config.data.path} has no labels; the probe needs them "
                              "(probe.enabled=False turns it off)")
    setup.check_labelled_pixels(fit_source, info, "probe.split", "the probe would learn nothing "
                                "(probe.enabled=False turns it off)", fraction_key="probe.fraction")
    eval_source, eval_info = setup.open_split(config.data.path, cfg.eval_split,
                                              cfg.get("eval_fraction"), split_key="probe.eval_split",
                                              fraction_key="probe.eval_fraction")
    setup.check_labelled_pixels(eval_source, eval_info, "probe.eval_split", "the probe's scores "
                                "would count nothing (probe.enabled=False turns it off)",
                                fraction_key="probe.eval_fraction")
    try:
      parallel.check_global_batch(cfg.batch_size, mesh, what="probe.batch_size")
    except ValueError as e:
      raise setup.ConfigError(str(e)) from None
    try:
      self.model = ProbeSegmenter(info.num_classes, cfg.head, **methods.model_kwargs(config))
    except ValueError as e:
      raise setup.ConfigError(str(e)) from None
    self.every_steps, self.steps = cfg.every_steps, cfg.steps
    self.history: list[dict[str, float]] = []
    self._mesh, self._rng = mesh, rng
    batch = cfg.batch_size // jax.process_count()
    norm = {"norm": pipelines.dataset_data_config(info, norm_mode=config.data.norm)["norm"]}
    self._fit_data = pipelines.eval_dataset(fit_source, batch_size=batch, config=norm)
    self._validate = finetune.make_validator(self.model, mesh, eval_source, info,
                                             cfg.batch_size, norm, prefix="probe")
    self._method = ProbeHeadMethod(model=self.model, ignore_index=info.ignore_index)
    self._tx, schedule = optim.build_optimizer(
        ml_collections.ConfigDict(dict(name="adam", lr=float(cfg.lr), lr_scaling="none",
                                       schedule="constant", weight_decay=0.0)),
        steps_per_epoch=1, num_epochs=1, num_devices=parallel.data_size(mesh),
        global_batch=cfg.batch_size)
    self._head_step = methods.make_train_step(self._method, self._tx, schedule, mesh)
    self._feature_step = _make_feature_step(self.model, mesh, info.ignore_index)
    self._initial_head = None

  def due(self, step: int, total_steps: int) -> bool:
    return step % self.every_steps == 0 or step == total_steps

  def __call__(self, state: Any, step: int) -> dict[str, float]:
    """Probes the pretraining `state` (not modified) after `step`.

    Returns its scores (also appended to `history`) and probe_seconds, the wall time.
    """
    start = time.perf_counter()
    frozen = {col: {k: getattr(state, col)[k] for k in FROZEN}
              for col in ("params", "batch_stats")}
    head = self.fit_head(self.features(frozen), step)
    scores = self._validate(types.SimpleNamespace(
        **{col: dict(frozen[col], **getattr(head, col)) for col in ("params", "batch_stats")}))
    self.history = [h for h in self.history if h["step"] < step] + [{"step": step, **scores}]
    return dict(scores, probe_seconds=time.perf_counter() - start)

  def features(self, frozen: dict) -> list[dict[str, jax.Array]]:
    """The head's batches: frozen features and labels of the fitting subset, sharded."""
    sharding = parallel.batch_sharding(self._mesh)
    return [self._feature_step(frozen, batch)
            for batch in pipelines.make_iterator(self._fit_data, sharding=sharding)]

  def fit_head(self, batches: list[dict[str, jax.Array]], step: int):
    """The head's train state after `steps` Adam steps through `batches` in turn, from its
    fixed initialisation; `step` seeds the decoder head's dropout."""
    head = self._fresh_head(batches[0])
    rng = jax.random.fold_in(self._rng, step)
    for i in range(self.steps):
      head, _ = self._head_step(head, batches[i % len(batches)], rng)
      # Hundreds of tiny sharded steps in flight deadlock XLA's CPU collectives (its
      # rendezvous times out); waiting for each costs microseconds on an accelerator.
      jax.block_until_ready(head.step)
    return head

  def _fresh_head(self, example: dict[str, jax.Array]):
    """The head's train state at its initialisation, on fresh device buffers (the step donates them)."""
    if self._initial_head is None:
      state = methods.init_train_state(self._method, self._tx, self._mesh,
                                       jax.random.fold_in(self._rng, 0), example)
      self._initial_head = jax.device_get(state)
    return parallel.replicate(self._initial_head, self._mesh)


def _make_feature_step(model: ProbeSegmenter, mesh: jax.sharding.Mesh, ignore_index: int):
  """Jitted (frozen variables, eval batch) -> the head's batch: features and labels, padding ignored."""
  def step(variables, batch):
    features = model.apply(variables, batch["image"], method=ProbeSegmenter.features)
    label = jnp.where(batch["valid"][:, None, None], batch["label"], ignore_index)
    return dict(features, label=label)

  return jax.jit(jax.shard_map(step, mesh=mesh,
                               in_specs=(parallel.REPLICATED_SPEC, parallel.BATCH_SPEC),
                               out_specs=parallel.BATCH_SPEC))


def build(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
          rng: jax.Array) -> OnlineProbe | None:
  """The run's probe, or None when the config has none or turns it off."""
  if "probe" not in config or not config.probe.enabled:
    return None
  return OnlineProbe(config, mesh, jax.random.fold_in(rng, RNG_STREAM))


def write_history(workdir: str | os.PathLike, history: list[dict[str, float]]) -> None:
  """<workdir>/probe.json = {'history': [{'step', 'probe_oa', ...}, ...]}, written whole or not at all."""
  if jax.process_index() != 0:
    return
  files.write_text_atomic(pathlib.Path(workdir) / HISTORY_FILE,
                          json.dumps({"history": history}, indent=1) + "\n")


def read_history(workdir: str | os.PathLike) -> list[dict[str, float]]:
  """The history a finished run wrote ([] when it ran no probe)."""
  path = pathlib.Path(workdir) / HISTORY_FILE
  if not path.exists():
    return []
  return json.loads(path.read_text())["history"]


def summary(history: list[dict[str, float]], eval_split: str) -> str:
  """One line: the probe's mIoU and OA at the first and the last step of `history` (not empty)."""
  def scores(h):
    return f"mIoU {100 * h['probe_miou']:.2f}%, OA {100 * h['probe_oa']:.2f}% at step {h['step']}"

  first, last = history[0], history[-1]
  start = f"{scores(first)}{' (untrained)' if first['step'] == 0 else ''}"
  return (f"Online probe (a head on the frozen features, scored on the {eval_split!r} split): "
          f"{start} → {scores(last)}")
