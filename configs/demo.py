"""The README's main job: the whole chain on the embedded synthetic corpus, on a CPU.

    python train.py --config=configs/demo.py --workdir=runs/demo

synthetic scenes → ArrayRecord dataset (128-pixel tiles, split by scene) →
short GLCNet pretraining (narrow ResNet-50) → fine-tuning on 1% of the labelled
training tiles, from the GLCNet checkpoint and from random init → evaluation
of both on the test scenes → a table. Each step resumes where it stopped.
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
  c.synthetic = dict(num_scenes=10, size=1024, bands=4, dtype="uint8")
  c.prep = dict(tile=128, split_fractions="train=0.7,val=0.1,test=0.2", label_fraction=0.01)

  pretrain = _sibling("pretrain").get_config("glcnet,tiny")
  pretrain.data.batch_size = 32
  # A short run on a small batch: the reference's lr of one GPU (1e-3, 1e-4) at these batches.
  pretrain.optimizer.reference_batch = 32
  pretrain.epochs = 12
  c.pretrain = pretrain

  finetune = _sibling("finetune").get_config("checkpoint,tiny")
  finetune.data.batch_size = 4
  finetune.optimizer.reference_batch = 4
  finetune.epochs = 80
  finetune.log_every = 20
  finetune.input.crop_size = 128
  c.finetune = finetune

  evaluate = _sibling("evaluate").get_config()
  evaluate.eval.crop = 128
  evaluate.eval.stride = 64
  c.evaluate = evaluate
  return c
