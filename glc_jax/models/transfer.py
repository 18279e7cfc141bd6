"""Initialise a fine-tuning DeepLabv3+ from a pretraining checkpoint."""
from __future__ import annotations

from typing import Any, Mapping

import flax
import jax
import numpy as np

TRANSFER_MODES = ("backbone", "backbone+encoder", "all")
# Parameters that never transfer under 'all': the classifier is sized for the
# pretext (the reference names it conv41 in GLCNet, conv4 when fine-tuning).
_NEVER = (("decoder", "classifier"),)


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def transfer_pretrained(finetune_vars: Mapping[str, Any],
                        pretrained_vars: Mapping[str, Any],
                        mode: str = "backbone+encoder") -> tuple[dict[str, Any], list[str]]:
  """Copy pretrained weights into freshly initialised fine-tuning variables.

  finetune_vars: {'params': ..., 'batch_stats': ...} of a DeepLabV3Plus (from
  its init). pretrained_vars: the same collections of any pretraining model
  here (GLCNet, SimCLR, MoCoV2 online network, Inpainting, Jigsaw) or an
  imported checkpoint; both must use the same depth/width/band count.
  mode: 'backbone' (the reference's load_self_parameters=0),
  'backbone+encoder' (=1, the default) or 'all' (=2: every leaf whose path
  and shape match, e.g. the GLCNet decoder's convs, never the classifier).
  BatchNorm running statistics travel with their layers.

  Returns (variables, names of the transferred leaves, '/'-joined). Raises
  ValueError naming the first leaf that is missing or has another shape
  inside a transferred subtree (e.g. another band count), or if nothing
  transfers.
  """
  if mode not in TRANSFER_MODES:
    raise ValueError(f"transfer mode must be one of {TRANSFER_MODES}, got {mode!r}")
  roots = {"backbone": ("backbone",), "backbone+encoder": ("backbone", "encoder"),
           "all": None}[mode]
  out, copied = {}, []
  held = {path[0] for tree in pretrained_vars.values() for path in _flat(tree)}
  for col, tree in finetune_vars.items():
    dst = _flat(tree)
    src = _flat(pretrained_vars.get(col, {}))
    for path, value in dst.items():
      if roots is not None and path[0] not in roots:
        continue
      if path not in src:
        if roots is None:
          continue
        hint = ("; it holds a backbone alone (torchvision weights, for one): set "
                "init.transfer=backbone" if held == {"backbone"} else "")
        raise ValueError(f"transfer: the pretrained checkpoint lacks {col}/{'/'.join(path)} "
                         f"needed by mode {mode!r}{hint}")
      if any(path[:len(n)] == n for n in _NEVER):
        continue
      if np.shape(src[path]) != np.shape(value):
        if roots is None:
          continue
        raise ValueError(
            f"transfer: {col}/{'/'.join(path)} has shape {np.shape(src[path])} in the "
            f"pretrained checkpoint but {np.shape(value)} in the fine-tuning model")
      dst[path] = jax.numpy.asarray(src[path], dtype=value.dtype)
      copied.append(f"{col}/{'/'.join(path)}")
    out[col] = flax.traverse_util.unflatten_dict(dst)
  if not copied:
    raise ValueError(f"transfer: no parameters of the pretrained checkpoint fit mode {mode!r}")
  return out, copied
