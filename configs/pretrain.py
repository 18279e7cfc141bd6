"""Self-supervised pretraining; the argument picks the method and an optional size.

    python train.py --config=configs/pretrain.py:glcnet --workdir=runs/glcnet \
        --config.data.path=/data/potsdam_tiles

Methods: glcnet, glcnet_nostyle, glcnet_noglobal, glcnet_nolocal, simclr, mocov2,
inpainting, jigsaw. Append ",tiny" (e.g. "glcnet,tiny") for a narrow ResNet-50
on small views that runs on a CPU in minutes, and/or ",reference" for the
original code's protocol where ours differs (docs/reproducing.md; each key is
also settable alone): the reference's patch overlap rule, no cross-device
negatives, per-device MoCo queues, per-epoch inpainting masks, the reference's
jigsaw permutation file (input.permutations, read from the working directory:
point it at the reference's permutations_1000.npy), torch's default first-conv
init for band counts other than 3, and a best_loss/ checkpoint of the epoch
with the lowest mean loss for fine-tuning to start from; it also turns the online probe off
(the reference has none, and its splits leave no validation split). Defaults are the reference's:
ResNet-50 DeepLabv3+ at output stride 16, 224×224 views, Adam (0.9, 0.99), L2 1e-5,
cosine decay to 4e-8, 400 epochs. `data.batch_size` is the global batch (all devices
and hosts); the lr is `optimizer.lr × data.batch_size / optimizer.reference_batch`,
1e-3 per 256 pairs, which is the reference's 1e-3 × GPUs at 256 pairs per GPU on any
number of devices (glc_jax/optim.py). For a batch of 256 per device on N devices,
set data.batch_size=256·N.
"""
import ml_collections

METHODS = ("glcnet", "glcnet_nostyle", "glcnet_noglobal", "glcnet_nolocal", "simclr", "mocov2",
           "inpainting", "jigsaw")


def _input(method: str, tiny: bool) -> ml_collections.ConfigDict:
  """The data recipe's size keys and protocol switches (glc_jax/data/recipes.py), listed in
  both sizes so that `--config.input.KEY=` can set them (other recipe keys can be added in a
  config file)."""
  if method == "inpainting":
    return ml_collections.ConfigDict(dict(view_size=96 if tiny else 224, blocks=16, block_size=16,
                                          masks="example"))
  if method == "jigsaw":
    return ml_collections.ConfigDict(
        dict(tile_size=32, tile_crop=28, augment=dict(crop_size=96), permutations="") if tiny else
        dict(tile_size=75, tile_crop=64, augment=dict(crop_size=225), permutations=""))
  if method.startswith("glcnet"):
    return ml_collections.ConfigDict(dict(view_size=96 if tiny else 224, patch_size=16 if tiny else 48,
                                          patch_num=4, patch_overlap="none"))
  return ml_collections.ConfigDict(dict(view_size=96 if tiny else 224))


def _loss(method: str) -> ml_collections.ConfigDict:
  if method.startswith("glcnet"):
    return ml_collections.ConfigDict(dict(temperature=0.5, weight=0.5, gather_negatives=True))
  if method == "simclr":
    return ml_collections.ConfigDict(dict(temperature=0.5, gather_negatives=True))
  if method == "mocov2":
    return ml_collections.ConfigDict(dict(temperature=0.07, momentum=0.999, queue_size=2048,
                                          queue_per_device=False))
  return ml_collections.ConfigDict()


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  parts = (arg or "glcnet").split(",")
  method, tiny, reference = parts[0], "tiny" in parts[1:], "reference" in parts[1:]
  if method not in METHODS or any(p not in ("tiny", "reference") for p in parts[1:]):
    raise ValueError(f"configs/pretrain.py: unknown variant {arg!r}; use one of {METHODS}, "
                     "optionally followed by ',tiny' and/or ',reference'")
  c = ml_collections.ConfigDict()
  c.stage = "pretrain"
  c.method = method
  c.seed = 0
  c.data = dict(path="", split="train", batch_size=32 if tiny else 256, num_workers=2 if tiny else 8,
                norm="reference")
  c.input = _input(method, tiny)
  # Compute (glc_jax/models/compute.py): "auto" = bfloat16 and plain convolutions on GPU/TPU,
  # float32 and the CPU kernels on CPU; remat: a jax.checkpoint policy name to save memory.
  c.model = dict(depth=50, output_stride=16, width=0.25 if tiny else 1.0, dtype="auto",
                 conv_impl="auto", remat="", stem_init="kaiming", bn_momentum=0.9)
  if method not in ("inpainting", "jigsaw"):
    c.model.embed_dim = 64
  if method == "jigsaw":
    c.model.num_permutations = 1000
  c.loss = _loss(method)
  c.optimizer = dict(name="adam", lr=1e-3, lr_scaling="batch", reference_batch=256, b1=0.9,
                     b2=0.99, eps=1e-8, weight_decay=1e-5, momentum=0.9, trust_coefficient=0.001,
                     schedule="cosine", end_lr=4e-8, decay_rate=0.98, per_epoch=True,
                     warmup_epochs=0.0, grad_clip_norm=0.0)
  if tiny:
    c.optimizer.reference_batch = c.data.batch_size  # 1e-3 at the tiny batch, as on one GPU
  if method == "mocov2" and tiny:
    c.loss.queue_size = 256
  c.epochs = 20 if tiny else 400
  c.num_steps = 0
  c.log_every = 10 if tiny else 50
  c.checkpoint_every = 50 if tiny else 1000
  c.keep_checkpoints = 2
  c.keep_best_loss = False
  # The online segmentation probe (docs/probe.md): a linear head on the frozen encoder's
  # features of 1% of the labelled training tiles, scored on the validation split.
  c.probe = dict(enabled=not tiny, every_steps=50 if tiny else 1000, split="train", fraction=0.01,
                 # A typed None, so that --config.probe.eval_fraction=0.05 parses.
                 eval_split="val", eval_fraction=ml_collections.config_dict.placeholder(float),
                 head="linear", steps=100 if tiny else 300,
                 lr=0.01, batch_size=16 if tiny else 64)
  if reference:
    _reference_protocol(c)
  return c


def _reference_protocol(c: ml_collections.ConfigDict) -> None:
  """The original code's behaviour for every key where ours differs (docs/reproducing.md)."""
  c.model.stem_init = "reference"
  c.keep_best_loss = True
  # The reference has no online probe, and its split layout (train and test) has no validation
  # split to score one on.
  c.probe.enabled = False
  if "gather_negatives" in c.loss:
    c.loss.gather_negatives = False
  if "patch_overlap" in c.input:
    c.input.patch_overlap = "reference"
  if c.method == "mocov2":
    c.loss.queue_per_device = True
  if c.method == "inpainting":
    c.input.masks = "epoch"
  if c.method == "jigsaw":
    c.input.permutations = "permutations_1000.npy"
