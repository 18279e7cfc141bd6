"""The README's main job: the whole chain on the embedded synthetic corpus, on a CPU.

    python train.py --config=configs/demo.py --workdir=runs/demo

synthetic scenes (10 of 512×512) → ArrayRecord dataset (64-pixel tiles, split
by scene) → short GLCNet pretraining (42 steps, ResNet-18 DeepLabv3+ at a
quarter of the width, 64-pixel views; the online probe's mIoU on the
validation scenes printed after it) → fine-tuning on 1% of the labelled
training tiles (5 tiles), from the GLCNet checkpoint and from random init →
evaluation of both on the test scenes (64-pixel windows at stride 32) → a
table, one preview picture per init and the list of what was written. Each
step resumes where it stopped.

Sized so that the README's first command, install included, stays within 5
minutes (issue 18's bound) on the slowest CPU of our machines (2 cores, AVX2
without AVX-512): compiling the five programs takes about half of the time,
so the steps, views and tiles are small; the measured figures and the
estimate for that CPU are in the README. `seed` seeds the
corpus, the split, pretraining and fine-tuning.
"""
import importlib.util
import pathlib

import ml_collections


def _sibling(name: str):
  spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name(f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "demo"
  c.seed = 0
  c.synthetic = dict(num_scenes=10, size=512, bands=4, dtype="uint8")
  c.prep = dict(tile=64, split_fractions="train=0.7,val=0.1,test=0.2", label_fraction=0.01)
  model = dict(depth=18, width=0.25)

  pretrain = _sibling("pretrain").get_config("glcnet,tiny")
  pretrain.model.update(model)
  pretrain.input.view_size = 64
  pretrain.input.patch_size = 16
  pretrain.data.batch_size = 32
  # In-process loading: worker processes take longer to start than these tiles take to load.
  pretrain.data.num_workers = 0
  # A short run on a small batch: the reference's lr of one GPU (1e-3, 1e-4) at these batches.
  pretrain.optimizer.reference_batch = 32
  pretrain.epochs = 3
  # The online probe after each of the 3 epochs and at step 0 (docs/probe.md): about 4 s of
  # the pretraining's 30 on the loaded Xeon once compiled (docs/benchmarks.md).
  pretrain.probe.enabled = True
  pretrain.probe.every_steps = 14
  c.pretrain = pretrain

  finetune = _sibling("finetune").get_config("checkpoint,tiny")
  finetune.model.update(model)
  finetune.data.batch_size = 2
  finetune.data.num_workers = 0
  finetune.optimizer.reference_batch = 2
  # 40 steps at 1e-4: fewer left GLCNet no better than random init; a larger lr let random
  # init catch up (measured, README).
  finetune.epochs = 20
  finetune.log_every = 20
  finetune.input.crop_size = 64
  # Batches of 2 tiles: with the reference's BatchNorm momentum (0.9) the running statistics
  # that validation reads are those of the last 2 tiles, and the validation OA (which picks the
  # checkpoint) jumped between 15% and 47% from one step to the next; torch's default 0.1
  # averages over about ten batches (measured, README).
  finetune.model.bn_momentum = 0.1
  c.finetune = finetune

  evaluate = _sibling("evaluate").get_config()
  evaluate.eval.crop = 64
  evaluate.eval.stride = 32  # overlapping windows, logits averaged: fewer seams at the 64-pixel crops
  c.evaluate = evaluate
  return c
