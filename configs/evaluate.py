"""Evaluation of a fine-tuned model on whole scenes of a split (sliding windows).

    python train.py --config=configs/evaluate.py --workdir=runs/eval_glcnet_1pct \
        --config.data.path=/data/potsdam_tiles --config.checkpoint=runs/ft_glcnet_1pct

The model's size comes from the checkpoint run's config.json; windows of 256
with stride 128 and averaged logits, as the reference evaluates. Variant
"reference" (or metrics_mode="reference") also reports the reference's mIoU:
per-class IoU per tile, a class absent from a tile scoring 0, averaged over
tiles (docs/reproducing.md).

On a split without labels (a dataset converted without --labels) it predicts instead:
predictions/<scene>_class.tif and <scene>_colour.tif, georeferenced as the scenes, and
predictions.json listing them, with no scores:

    python train.py --config=configs/evaluate.py --workdir=runs/map_2024 \
        --config.data.path=/data/new_scenes --config.data.split=train \
        --config.checkpoint=runs/ft_glcnet_1pct
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  if arg not in (None, "", "reference"):
    raise ValueError(f"configs/evaluate.py: unknown variant {arg!r}; use none or 'reference'")
  c = ml_collections.ConfigDict()
  c.stage = "evaluate"
  # norm "": the checkpoint run's data.norm (its config.json); another value is refused.
  c.data = dict(path="", split="test", norm="")
  c.checkpoint = ""
  c.model_from_checkpoint = True
  # Compute (glc_jax/models/compute.py): "auto" = bfloat16 and plain convolutions on GPU/TPU,
  # float32 and the CPU kernels on CPU; remat: a jax.checkpoint policy name to save memory.
  c.model = dict(depth=50, output_stride=16, width=1.0, dtype="auto", conv_impl="auto", remat="")
  c.eval = dict(crop=256, stride=128, batch_size=8)
  c.write_predictions = True
  c.metrics_mode = "reference" if arg == "reference" else "ours"
  return c
