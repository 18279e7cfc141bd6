"""Evaluation of a fine-tuned model on whole scenes of a split (sliding windows).

    python train.py --config=configs/evaluate.py --workdir=runs/eval_glcnet_1pct \
        --config.data.path=/data/potsdam_tiles --config.checkpoint=runs/ft_glcnet_1pct

The model's size comes from the checkpoint run's config.json; windows of 256
with stride 128 and averaged logits, as the reference evaluates.
"""
import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.stage = "evaluate"
  c.data = dict(path="", split="test", norm="reference")
  c.checkpoint = ""
  c.model_from_checkpoint = True
  # Compute (glc_jax/models/compute.py): "auto" = bfloat16 and plain convolutions on GPU/TPU,
  # float32 and the CPU kernels on CPU; remat: a jax.checkpoint policy name to save memory.
  c.model = dict(depth=50, output_stride=16, width=1.0, dtype="auto", conv_impl="auto", remat="")
  c.eval = dict(crop=256, stride=128, batch_size=8)
  c.write_predictions = True
  return c
