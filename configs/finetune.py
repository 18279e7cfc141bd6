"""Fine-tuning DeepLabv3+ from a pretraining checkpoint (or random init) on a label fraction.

    python train.py --config=configs/finetune.py --workdir=runs/ft_glcnet_1pct \
        --config.data.path=/data/potsdam_tiles --config.init.path=runs/glcnet

Argument: "checkpoint" (default) or "random", optionally ",tiny". Defaults are
the reference's: batch 16, 150 epochs, Adam lr 1e-4 (0.9, 0.99), L2 1e-5, lr ×
0.98 per epoch (a larger global batch scales the lr: 1e-4 per 16 examples), backbone + encoder transferred, 256×256 crops with the
reference's augmentation. The best state by validation OA is kept (the
reference's criterion), on `data.val_split`, apart from the test split.
`early_stopping.patience` > 0 ends the run after that many validations (one
every `validate_every_epochs` epochs, and one at the last step) without a new best; 0, the default, trains every epoch as the
reference does. A run that stopped stays stopped when rerun, also with more
epochs; a rerun with a larger patience trains on (the key may change on resume).

Append ",reference" for the original code's protocol where ours differs
(docs/reproducing.md; each key is also settable alone): start from the
pretraining epoch with the lowest mean loss (init.checkpoint="best_loss"),
warp labels bilinearly with fill 0 (input.label_warp), torch's default
first-conv init for band counts other than 3, and select the best epoch on the
split that is reported (data.val_split="test"). The reference's 1% subset is a
dataset matter: data_prep --subset-list 0.01=trainR1_RGBIR.txt.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = (arg or "checkpoint").split(",")
  kind, tiny, reference = parts[0], "tiny" in parts[1:], "reference" in parts[1:]
  if kind not in ("checkpoint", "random") or any(p not in ("tiny", "reference") for p in parts[1:]):
    raise ValueError(f"configs/finetune.py: unknown variant {arg!r}; use checkpoint or random, "
                     "optionally followed by ',tiny' and/or ',reference'")
  c = ml_collections.ConfigDict()
  c.stage = "finetune"
  c.seed = 0
  c.data = dict(path="", split="train", label_fraction=0.01, val_split="val",
                batch_size=8 if tiny else 16, num_workers=2 if tiny else 8, norm="reference")
  c.init = dict(kind=kind, path="", transfer="backbone+encoder", checkpoint="latest")
  c.input = dict(crop_size=128 if tiny else 256, label_warp="nearest")
  # Compute (glc_jax/models/compute.py): "auto" = bfloat16 and plain convolutions on GPU/TPU,
  # float32 and the CPU kernels on CPU; remat: a jax.checkpoint policy name to save memory.
  # bn_momentum: BatchNorm's running-average momentum (torch's convention), the reference's 0.9;
  # evaluation reads the running statistics, and with batches of a few tiles 0.1 steadies them.
  c.model = dict(depth=50, output_stride=16, width=0.25 if tiny else 1.0, dtype="auto",
                 conv_impl="auto", remat="", stem_init="kaiming", bn_momentum=0.9)
  c.optimizer = dict(name="adam", lr=1e-4, lr_scaling="batch", reference_batch=16, b1=0.9, b2=0.99, eps=1e-8,
                     weight_decay=1e-5, schedule="exponential", decay_rate=0.98, per_epoch=True,
                     warmup_epochs=0.0, grad_clip_norm=0.0)
  if tiny:
    c.optimizer.reference_batch = c.data.batch_size  # 1e-4 at the tiny batch
  c.epochs = 30 if tiny else 150
  c.log_every = 10 if tiny else 50
  c.checkpoint_every = 50 if tiny else 500
  c.keep_checkpoints = 2
  c.select_metric = "val_oa"
  c.early_stopping = dict(patience=0)
  c.validate_every_epochs = 1
  if reference:
    c.init.checkpoint = "best_loss"
    c.input.label_warp = "reference"
    c.model.stem_init = "reference"
    c.data.val_split = "test"
  return c
