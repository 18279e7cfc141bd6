"""The controlled comparison: pretraining methods × label fractions × seeds, one table out.

    python -m glc_jax.benchmark --config=configs/benchmark.py --workdir=runs/bench \
        --config.data.path=/data/potsdam_tiles [--config.imagenet_path=ckpt/resnet50_imagenet]
    python -m glc_jax.benchmark --config=configs/benchmark.py:small --workdir=runs/bench_small
    python -m glc_jax.benchmark --config=configs/benchmark.py:smoke --workdir=runs/bench_smoke

Every method gets the same backbone, data, budget and seeds. Per method and
seed one pretraining run; per label fraction one fine-tuning run from it
(also from random init, and from ImageNet weights when `imagenet_path` is
set); each evaluated on `evaluate.data.split` (test). The stage configs come
from configs/{pretrain,finetune,evaluate}.py; `pretrain`, `finetune` and
`evaluate` below override their keys for every cell.

Variants:
  smoke      the small variant cut to a check that the whole benchmark runs: glcnet
             and random init, fraction 0.25, seeds 0 and 1, a corpus of 8 scenes,
             4 pretraining and 10 fine-tuning steps; about 2-3 minutes on a 2-core
             CPU. Its scores mean nothing.
  (default)  all 8 methods + random (+ imagenet) × fractions 0.01, 0.05, 0.1,
             0.25, 0.5, 1.0 × seeds 0, 1, 2; full-size model, the reference's
             budgets (400 pretraining epochs, 150 fine-tuning epochs).
  small      the synthetic corpus (made in the workdir when data.path is empty),
             the tiny model, glcnet, simclr and random init, fractions 0.05 and
             0.25, seeds 0 and 1; about 15-20 minutes on a quiet 2-core CPU.
  medium     the same corpus, all 8 methods + random init, fractions 0.05 and
             0.25, seeds 0-4, a ResNet-18 DeepLabv3+ at a quarter of the width,
             fine-tuning with early stopping (best step reported per run); sized
             to finish within one working session on a 2-core CPU
             (docs/benchmark_results.md has the measured wall time).
"""
import ml_collections

ALL_METHODS = ("glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr", "mocov2",
               "inpainting", "jigsaw")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "full"
  if variant not in ("full", "smoke", "small", "medium"):
    raise ValueError(f"configs/benchmark.py: unknown variant {arg!r}; use 'smoke', 'small', "
                     "'medium' or none")
  if variant == "medium":
    return _medium()
  if variant == "smoke":
    return _smoke()
  small = variant == "small"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.methods = ("glcnet", "simclr") if small else ALL_METHODS
  c.random_init = True
  # An import_torch checkpoint of ImageNet ResNet weights; empty = no ImageNet row.
  c.imagenet_path = ""
  c.fractions = (0.05, 0.25) if small else (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
  c.seeds = (0, 1) if small else (0, 1, 2)
  c.size = "tiny" if small else "full"

  # data.path: a data_prep dataset with train/val/test splits. Empty (small
  # variant): a synthetic corpus is rendered and converted under the workdir.
  c.data = dict(path="", train_split="train", val_split="val", test_split="test")
  # 40 scenes of 512² → 640 tiles of 128² (480 train, 32 val, 128 test): many
  # scenes for scene-level style variety, and 24 labelled tiles at 5%.
  c.synthetic = dict(num_scenes=40, size=512, bands=4, seed=0, tile=128,
                     split_fractions="train=0.75,val=0.05,test=0.2")

  # Overrides of configs/pretrain.py (per method; the same for every method).
  # The online probe (docs/probe.md) gives the table's first mIoU column and probe_miou.png;
  # the tiny model has it off by default, so the small variant turns it on (every epoch).
  c.pretrain = ml_collections.ConfigDict(
      dict(epochs=6, data=dict(batch_size=32, num_workers=0),
           probe=dict(enabled=True, every_steps=15)) if small else dict(epochs=400))
  # Overrides of configs/finetune.py. `finetune_steps` > 0 gives every label
  # fraction about the same number of updates (epochs = ceil(steps / steps
  # per epoch)); 0 keeps finetune.epochs (the reference: 150 at any fraction).
  c.finetune = ml_collections.ConfigDict(
      dict(data=dict(batch_size=8, num_workers=0), input=dict(crop_size=128)) if small else
      dict(epochs=150))
  c.finetune_steps = 150 if small else 0
  # > 0: validate every this many steps and stop after this many without improvement, each
  # rounded to whole epochs of a cell's subset; 0 keeps the stage config's
  # validate_every_epochs and early_stopping.patience.
  c.finetune_validate_steps = 0
  c.finetune_patience_steps = 0
  c.imagenet_transfer = "backbone"
  # Overrides of configs/evaluate.py.
  c.evaluate = ml_collections.ConfigDict(
      dict(eval=dict(crop=128, stride=64, batch_size=16), write_predictions=False) if small else
      dict(write_predictions=False))
  # Persistent XLA compilation cache shared by all cells (same shapes compile once).
  c.compilation_cache = True
  return c


def _smoke() -> ml_collections.ConfigDict:
  """Every step of the benchmark (corpus, pretraining with the probe, fine-tuning from both
  inits, evaluation, results.md with its paired section, the plots) at the least work."""
  c = get_config("small")
  c.variant = "smoke"
  c.methods = ("glcnet",)
  c.fractions = (0.25,)
  # 8 scenes of 256² → 32 tiles of 128² (16 train, 8 val, 8 test); 4 labelled tiles at 25%.
  c.synthetic.num_scenes = 8
  c.synthetic.size = 256
  c.synthetic.split_fractions = "train=0.5,val=0.25,test=0.25"
  c.pretrain = ml_collections.ConfigDict(
      dict(epochs=2, data=dict(batch_size=8, num_workers=0),
           probe=dict(enabled=True, every_steps=2)))
  c.finetune = ml_collections.ConfigDict(
      dict(data=dict(batch_size=4, num_workers=0), input=dict(crop_size=128)))
  c.finetune_steps = 10
  c.finetune_validate_steps = 5
  return c


def _medium() -> ml_collections.ConfigDict:
  """Every method and ablation against random init, with enough seeds for paired intervals.

  Sized on the 2-core CPU (docs/benchmark_results.md, medium): the demo's ResNet-18 at a
  quarter of the width, and fine-tuning that converges and stops early, so the budget
  goes where the validation score still moves.
  """
  c = get_config("small")
  c.variant = "medium"
  c.methods = ALL_METHODS
  c.seeds = (0, 1, 2, 3, 4)
  model = dict(depth=18)
  # No online probe: at 40 pretraining runs its step-0 compile and fits cost ~10 minutes.
  c.pretrain = ml_collections.ConfigDict(
      dict(epochs=6, model=model, data=dict(batch_size=32, num_workers=0),
           probe=dict(enabled=False)))
  # lr 5e-4 rather than the reference's 1e-4: at 1e-4 the 25% runs still improved at step
  # 585 of 600 and trees stayed at 0.5-10% IoU; at 5e-4 the seed-0 runs peaked at steps
  # 330-540 and trees reached 10-70% IoU (docs/benchmark_results.md, medium). 64-pixel
  # crops instead of 96 make a run about 40% cheaper, which is what lets five seeds fit
  # in a working session; they cost 1-4 OA points at 25% and 9-22 at 5% (seed 0).
  c.finetune = ml_collections.ConfigDict(
      dict(model=model, data=dict(batch_size=8, num_workers=0), input=dict(crop_size=64),
           optimizer=dict(lr=5e-4)))
  # Validation OA swings by up to 0.15 between checks 15 steps apart, so the early-stopping
  # window is wide: 10 validations. One validation every 15 steps at both fractions (at 5%
  # an epoch is 3 steps, and validating each one cost twice the training).
  c.finetune_steps = 600
  c.finetune_validate_steps = 15
  c.finetune_patience_steps = 150
  return c
