"""The online probe's head, trained alone on frozen features (glc_jax/stages/probe.py)."""
from __future__ import annotations

import dataclasses

import jax

from glc_jax.methods.common import Batch
from glc_jax.methods.segmentation import SegmentationMethod
from glc_jax.models.probe import ProbeSegmenter


@dataclasses.dataclass(frozen=True)
class ProbeHeadMethod(SegmentationMethod):
  """Pixel-wise cross-entropy of a ProbeSegmenter's head on cached features.

  The train state holds the head's variables only ('head'); the frozen
  backbone and encoder are not part of it. Batch: the features of
  ProbeSegmenter.features (encoder, and low_level for the decoder head) and
  label (B, H, W) int32 with `ignore_index` where nothing counts.
  """
  model: ProbeSegmenter
  batch_keys: tuple[str, ...] = ("encoder", "label")

  def _features(self, batch: Batch) -> dict[str, jax.Array]:
    return {k: batch[k] for k in ("encoder", "low_level") if k in batch}

  def init_inputs(self, batch: Batch):
    return ((self._features(batch), tuple(batch["label"].shape[1:3])),
            {"method": ProbeSegmenter.classify})

  def logits(self, params, batch_stats, batch: Batch, rng: jax.Array):
    logits, mutated = self.model.apply(
        {"params": params, "batch_stats": batch_stats}, self._features(batch),
        tuple(batch["label"].shape[1:3]), train=True, method=ProbeSegmenter.classify,
        mutable=["batch_stats"], rngs={"dropout": rng})
    return logits, mutated.get("batch_stats", {})
