"""Import PyTorch weights: reference GLCNet / DeepLab state_dicts, torchvision ResNets.

Usage:
  python -m glc_jax.tools.import_torch SRC OUT --kind {glcnet,deeplab,torchvision}
      [--bands N] [--depth 50|101] [--allow-missing]

SRC is a torch checkpoint (.pth/.pt, a state_dict; needs the optional torch
extra) or an .npz of numpy arrays keyed by the same names. OUT is a new
directory written with Orbax (`StandardCheckpointer`) holding the pytree
{'params': ..., 'batch_stats': ...} in this package's parameter layout; read it
back with `load_imported(OUT)` and give it to `glc_jax.models.transfer_pretrained`
(fine-tuning) or use it as the initial variables of the matching model.

Kinds:
  glcnet      the reference's GLCNet (models/GLCNet.py) → `GLCNet` variables
              (backbone, encoder, decoder, global_head = `proj`, local_head =
              `proj1`); also accepts the plain v3p model.
  deeplab     a fine-tuned reference DeepLabv3+ (v3p_encoder_ft / v3p_resnet_ft /
              v3p_decoder12_ft / v3p: `decoder_ft`, `encoder_ft`, `decoder.conv3t`
              all map onto our names) → `DeepLabV3Plus` variables.
  torchvision torchvision resnet50/101 ImageNet weights → {'backbone': ...}
              only, for transfer mode 'backbone'. The 3-band first conv is
              widened to --bands: RGB filters kept in bands 0–2, every other
              band gets the mean of the RGB filters, and all filters are
              scaled by 3/bands, so that for inputs whose bands have similar
              statistics the first conv's output keeps the scale it had on
              RGB (the sum of each filter over bands is unchanged). With fewer
              than 3 bands, each band gets the RGB mean × 3/bands. Inputs are
              then normalised our way (x/255·3.2−1.6), not with ImageNet
              statistics; fine-tuning adapts the first BN.

Name mapping: `a.b.0.c` → nested dicts; conv weights (O, I, kh, kw) →
kernel (kh, kw, I, O); linear weights (O, I) → kernel (I, O); BN weight/bias →
scale/bias; running_mean/var → batch_stats mean/var; num_batches_tracked and
torch's `module.` prefix are dropped. Keys with no mapping, keys the model does
not have, missing leaves and shape mismatches are reported by name; any of
them is an error, except missing leaves with --allow-missing (they are left
out of OUT, so a consumer keeps its own init for them).
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import zipfile
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

# (pattern on the dotted module path, replacement with '/' separators).
_MODULE_RULES = [
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.0$", r"backbone/layer\1_\2/downsample_conv"),
    (r"^backbone\.layer(\d)\.(\d+)\.downsample\.1$", r"backbone/layer\1_\2/downsample_bn"),
    (r"^backbone\.layer(\d)\.(\d+)\.((?:conv|bn)[123])$", r"backbone/layer\1_\2/\3"),
    (r"^backbone\.(conv1|bn1)$", r"backbone/\1"),
    (r"^encoder\.ASPP\._atrous_convolution(\d)\.0$", r"encoder/aspp/conv\1"),
    (r"^encoder\.ASPP\._atrous_convolution(\d)\.1$", r"encoder/aspp/bn\1"),
    (r"^encoder\.ASPP\._image_pool\.1$", r"encoder/aspp/pool_conv"),
    (r"^encoder\.ASPP\._image_pool\.2$", r"encoder/aspp/pool_bn"),
    (r"^encoder\.(conv1|bn1)$", r"encoder/\1"),
    (r"^decoder\.((?:conv|bn)[123])t?$", r"decoder/\1"),
    (r"^decoder\.conv41?$", r"decoder/classifier"),
    (r"^proj\.0$", r"global_head/fc1"),
    (r"^proj\.2$", r"global_head/fc2"),
    (r"^proj1\.0$", r"local_head/fc1"),
    (r"^proj1\.2$", r"local_head/fc2"),
]
_RENAMES = [(r"^module\.", ""), (r"^encoder_ft\.", "encoder."), (r"^decoder_ft\.", "decoder.")]
KINDS = ("glcnet", "deeplab", "torchvision")


def flax_path(torch_key: str) -> tuple[str, tuple[str, ...]] | None:
  """(collection, path) for a torch state_dict key, or None if unmapped.

  The leaf name is 'kernel'/'scale' for weights, decided later from the rank.
  """
  for pattern, repl in _RENAMES:
    torch_key = re.sub(pattern, repl, torch_key)
  module, _, leaf = torch_key.rpartition(".")
  for pattern, repl in _MODULE_RULES:
    if re.match(pattern, module):
      path = tuple(re.sub(pattern, repl, module).split("/"))
      break
  else:
    return None
  if leaf == "running_mean":
    return "batch_stats", path + ("mean",)
  if leaf == "running_var":
    return "batch_stats", path + ("var",)
  if leaf in ("weight", "bias"):
    return "params", path + (leaf,)
  return None


def _convert_leaf(path: tuple[str, ...], value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  if path[-1] != "weight":
    return path, value
  if value.ndim == 4:
    return path[:-1] + ("kernel",), value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return path[:-1] + ("kernel",), value.T
  return path[:-1] + ("scale",), value


def widen_first_conv(weight: np.ndarray, bands: int) -> np.ndarray:
  """(64, 3, k, k) RGB filters → (64, bands, k, k), rule in the module docstring."""
  rgb_mean = weight.mean(axis=1, keepdims=True)
  if bands >= 3:
    extra = np.repeat(rgb_mean, bands - 3, axis=1)
    wide = np.concatenate([weight, extra], axis=1)
  else:
    wide = np.repeat(rgb_mean, bands, axis=1)
  return (wide * (3.0 / bands)).astype(weight.dtype)


def build_template(kind: str, bands: int, depth: int, num_classes: int | None,
                   embed_dim: int | None, width: float = 1.0) -> dict[str, Any]:
  """Shapes of the target model's variables (jax.eval_shape; costs nothing)."""
  from glc_jax import models  # pylint: disable=import-outside-toplevel
  x = jnp.zeros((1, 64, 64, bands))
  key = jax.random.key(0)
  if kind == "glcnet":
    boxes = jnp.zeros((1, 1, 4), jnp.int32)
    net = models.GLCNet(depth=depth, width=width, embed_dim=embed_dim or 64)
    return jax.eval_shape(lambda: net.init(key, x, x, boxes, boxes, train=False))
  if kind == "deeplab":
    net = models.DeepLabV3Plus(num_classes=num_classes or 6, depth=depth, width=width)
    return jax.eval_shape(lambda: net.init(key, x, train=False))
  net = models.ResNet(depth=depth, width=width)
  shapes = jax.eval_shape(lambda: net.init(key, x, train=False))
  return {col: {"backbone": tree} for col, tree in shapes.items()}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], kind: str, *,
                       bands: int | None = None, depth: int | None = None,
                       allow_missing: bool = False) -> tuple[dict[str, Any], list[str]]:
  """Map a torch state_dict (numpy values) onto this package's variables.

  Returns ({'params', 'batch_stats'} nested dicts of float32 numpy arrays,
  report lines). Raises ValueError listing every problem by key name.
  """
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  sd = {k: np.asarray(v) for k, v in state_dict.items()
        if not k.endswith("num_batches_tracked")}
  if kind == "torchvision":
    sd = {f"backbone.{k}": v for k, v in sd.items()}
  first = sd.get("backbone.conv1.weight", sd.get("module.backbone.conv1.weight"))
  if first is None:
    raise ValueError("state_dict has no backbone.conv1.weight (torchvision: conv1.weight); "
                     "is this the right --kind?")
  if kind == "torchvision":
    bands = bands or 4
    if first.shape[1] != bands:
      sd["backbone.conv1.weight"] = widen_first_conv(first, bands)
  bands = bands or first.shape[1]
  if depth is None:
    blocks = {int(m.group(1)) for k in sd
              if (m := re.match(r"(?:module\.)?backbone\.layer3\.(\d+)\.", k))}
    depth = 101 if len(blocks) == 23 else 50
  num_classes = embed_dim = None
  for k, v in sd.items():
    if re.search(r"decoder(_ft)?\.conv41?\.weight$", k):
      num_classes = embed_dim = v.shape[0]
    if re.search(r"^(module\.)?proj\.2\.weight$", k):
      embed_dim = v.shape[0]
  # Narrow networks (tests) are recognised by the stem's channel count.
  width = first.shape[0] / 64
  template = build_template(kind, bands, depth, num_classes, embed_dim, width)
  want = {(col,) + path: leaf for col, tree in template.items()
          for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}

  unmapped, unexpected, mismatched, got = [], [], [], {}
  for key, value in sd.items():
    target = flax_path(key)
    if target is None:
      unmapped.append(key)
      continue
    col, path = target
    torch_shape = tuple(value.shape)
    path, value = _convert_leaf(path, value)
    full = (col,) + path
    if full not in want:
      unexpected.append(f"{key} (→ {'/'.join(full)})")
    elif tuple(value.shape) != tuple(want[full].shape):
      mismatched.append(f"{key}: {torch_shape} (→ {tuple(value.shape)}) vs model "
                        f"{'/'.join(full)} {tuple(want[full].shape)}")
      got[full] = None
    else:
      got[full] = value.astype(np.float32)
  missing = ["/".join(p) for p in want if p not in got]
  got = {p: v for p, v in got.items() if v is not None}
  report = [f"kind={kind} depth={depth} bands={bands} width={width:g}: "
            f"{len(got)} of {len(want)} leaves set"]
  ignorable = {"torchvision": lambda k: k.startswith("backbone.fc.")}.get(kind, lambda k: False)
  for title, names in (("unknown keys", [k for k in unmapped if not ignorable(k)]),
                       ("keys the model does not have", unexpected),
                       ("shape mismatches", mismatched), ("missing", missing)):
    if names:
      report.append(f"{title} ({len(names)}): " + ", ".join(names))
  ignored = [k for k in unmapped if ignorable(k)]
  if ignored:
    report.append(f"ignored ({len(ignored)}): " + ", ".join(ignored))
  if mismatched or unexpected or [k for k in unmapped if not ignorable(k)] or (
      missing and not allow_missing):
    raise ValueError("\n".join(report))
  nested = flax.traverse_util.unflatten_dict(got)
  return {col: nested.get(col, {}) for col in ("params", "batch_stats")}, report


def read_state_dict(src: str) -> dict[str, np.ndarray]:
  """A state_dict from .npz, or from a torch file (requires torch).

  Raises OSError (strerror says why) for a path that is not a readable file,
  checked first so that a typo is not reported as a missing torch.
  """
  if os.path.isdir(src):
    raise IsADirectoryError(errno.EISDIR, "is a directory, not a checkpoint file", src)
  if not os.path.exists(src):
    raise FileNotFoundError(errno.ENOENT, "does not exist", src)
  if src.endswith(".npz"):
    try:
      data = np.load(src)
    # pickled or empty (allow_pickle=False refuses both), or a damaged zip
    except (ValueError, EOFError, zipfile.BadZipFile):
      data = None
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise SystemExit(f"{src}: not an .npz archive of arrays (numpy.savez)")
    with data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit(f"{src}: reading torch checkpoints needs torch "
                     "(pip install 'glc-jax[torch]'), or convert it to .npz") from e
  obj = torch.load(src, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  if not isinstance(obj, dict):
    raise SystemExit(f"{src}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
  return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def save_imported(out: str, variables: Mapping[str, Any]) -> None:
  """Write {'params', 'batch_stats'} to a new Orbax checkpoint directory."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise SystemExit(f"{out}: already exists; refusing to overwrite")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out, jax.tree.map(jnp.asarray, dict(variables)))
  ckptr.wait_until_finished()


def load_imported(path: str) -> dict[str, Any]:
  """Read back what `save_imported` wrote: {'params', 'batch_stats'}."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def _band_count(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = None
  if value is None or value < 1:
    raise argparse.ArgumentTypeError(f"{text} is not a band count (1 or more)")
  return value


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("src", help="state_dict file (.pth/.pt with torch, or .npz)")
  parser.add_argument("out", help="new Orbax checkpoint directory")
  parser.add_argument("--kind", choices=KINDS, default="glcnet")
  parser.add_argument("--bands", type=_band_count, default=None,
                      help="input bands (torchvision: width of the new first conv; default 4)")
  parser.add_argument("--depth", type=int, choices=(50, 101), default=None,
                      help="ResNet depth (default: inferred from the keys)")
  parser.add_argument("--allow-missing", action="store_true",
                      help="keep going when model leaves have no source key")
  args = parser.parse_args(argv)
  try:
    variables, report = convert_state_dict(read_state_dict(args.src), args.kind,
                                           bands=args.bands, depth=args.depth,
                                           allow_missing=args.allow_missing)
  except OSError as e:
    print(f"{args.src}: {e.strerror}", file=sys.stderr)
    return 1
  except ValueError as e:
    print(f"{args.src}: cannot import:\n{e}", file=sys.stderr)
    return 1
  print("\n".join(report))
  save_imported(args.out, variables)
  print(f"wrote {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
