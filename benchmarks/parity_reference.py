"""Numerical parity of our GLCNet with the reference PyTorch GLCNet (eval mode).

Two stages, because the reference needs torch and this package needs jax:

  1. export (run with a Python that has torch + torchvision, e.g.
     /work/scratch/torchvenv/bin/python):
       python benchmarks/parity_reference.py export REF_DIR OUT.npz
     REF_DIR is a checkout of the reference's T-SS-GLCNet folder (it is
     imported from there, never copied). Builds its GLCNet (ResNet-50, 4 bands,
     64-d heads, OS16, random init with randomised BN statistics/affines so
     that the BN import is exercised), runs two 224×224 views with 4 patch
     boxes each in eval mode and saves the state_dict (prefix `sd/`), the
     inputs and every intermediate (both backbone maps, encoder, decoder before
     upsampling, q, k, q1, k1); and the logits of a fine-tuning DeepLabv3+
     (v3p_encoder_ft, 6 classes) on view 1 with its own state_dict; and, in
     train mode with the encoder dropout set to 0, the four embeddings and
     every BN running statistic after the step (momentum 0.9, unbiased
     running variance, view 1 then view 2).
  2. compare (run with this package's venv), once per convolution path
     (model.conv_impl; both must pass):
       python benchmarks/parity_reference.py compare OUT.npz --conv-impl plain
       python benchmarks/parity_reference.py compare OUT.npz --conv-impl cpu
     imports the state_dicts with glc_jax.tools.import_torch, runs our GLCNet
     and DeepLabV3Plus in float32 with matmul precision 'highest' and prints, per output, the
     max abs error / max |reference| and the relative Frobenius error. Exit
     status 1 if any exceeds --tol (default 1e-5).

Boxes: the reference pools each patch with RoIPool(patch × patch) then
averages; with a roi (x0, y0, x0+p−1, y0+p−1) every bin is one pixel, so that
equals the mean over our half-open box (y0, x0, y0+p, x0+p).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

PATCH = 16
SIZE = 224
BANDS = 4
BATCH = 2


def _boxes(rng: np.random.Generator) -> np.ndarray:
  """(BATCH, 4, 4) int32 half-open (y0, x0, y1, x1) boxes of side PATCH."""
  y0 = rng.integers(0, SIZE - PATCH + 1, size=(BATCH, 4))
  x0 = rng.integers(0, SIZE - PATCH + 1, size=(BATCH, 4))
  return np.stack([y0, x0, y0 + PATCH, x0 + PATCH], -1).astype(np.int32)


def _randomise_bn(model, rng: np.random.Generator) -> None:
  """Random BN running statistics and affines, so their import is exercised."""
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.copy_(torch.from_numpy(rng.normal(0, 0.1, buf.shape).astype(np.float32)))
      elif name.endswith("running_var"):
        buf.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, buf.shape).astype(np.float32)))
    for mod in model.modules():
      if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        mod.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, mod.weight.shape).astype(np.float32)))
        mod.bias.copy_(torch.from_numpy(rng.normal(0, 0.1, mod.bias.shape).astype(np.float32)))


def export(ref_dir: str, out: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, ref_dir)
  from models import GLCNet  # pylint: disable=import-outside-toplevel,import-error
  from models import v3p_encoder_ft  # pylint: disable=import-outside-toplevel,import-error

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  model = GLCNet.build_model(num_classes=64, in_channels=BANDS, arch="resnet50",
                             patch_size=PATCH, patch_num=4)
  _randomise_bn(model, rng)
  model.eval()
  captured: dict[str, list[np.ndarray]] = {}

  def hook(name):
    def fn(_, __, output):
      outs = output if isinstance(output, tuple) else (output,)
      for i, o in enumerate(outs):
        captured.setdefault(f"{name}{i}", []).append(o.detach().numpy().transpose(0, 2, 3, 1))
    return fn

  model.backbone.register_forward_hook(hook("backbone"))
  model.encoder.register_forward_hook(hook("encoder"))
  model.decoder.register_forward_hook(hook("decoder"))
  views = rng.normal(0, 1, size=(2, BATCH, SIZE, SIZE, BANDS)).astype(np.float32)
  boxes = np.stack([_boxes(rng), _boxes(rng)])
  rois = np.zeros((BATCH, 4, 10), np.float32)
  for v in range(2):  # (idx, x1, y1, x2, y2) inclusive pixel corners
    b = boxes[v]
    rois[..., 5 * v + 1:5 * v + 5] = np.stack([b[..., 1], b[..., 0], b[..., 3] - 1,
                                               b[..., 2] - 1], -1)
  with torch.no_grad():
    q, k, q1, k1 = model(torch.from_numpy(views[0].transpose(0, 3, 1, 2)),
                         torch.from_numpy(views[1].transpose(0, 3, 1, 2)),
                         torch.from_numpy(rois))
  # Copies: the train-mode pass below updates the running statistics in place.
  arrays = {f"sd/{k_}": v.detach().numpy().copy() for k_, v in model.state_dict().items()}
  arrays.update(views=views, boxes=boxes, q=q.numpy(), k=k.numpy(),
                q1=q1.numpy().reshape(BATCH, 4, -1), k1=k1.numpy().reshape(BATCH, 4, -1))
  names = {"backbone0": "backbone_high", "backbone1": "backbone_low",
           "encoder0": "encoder", "decoder0": "decoder"}
  for key, maps in captured.items():
    arrays[f"{names[key]}/view1"], arrays[f"{names[key]}/view2"] = maps
  # Train mode (batch statistics, running-statistics updates over the two
  # successive views), with the encoder's dropout disabled to be deterministic.
  model.train()
  model.encoder.dropout.p = 0.0
  with torch.no_grad():
    q, k, q1, k1 = model(torch.from_numpy(views[0].transpose(0, 3, 1, 2)),
                         torch.from_numpy(views[1].transpose(0, 3, 1, 2)),
                         torch.from_numpy(rois))
  arrays.update(train_q=q.numpy(), train_k=k.numpy(), train_q1=q1.numpy().reshape(BATCH, 4, -1),
                train_k1=k1.numpy().reshape(BATCH, 4, -1))
  arrays.update({f"train_sd/{k_}": v.detach().numpy().copy()
                 for k_, v in model.state_dict().items()})
  # The same pass in float64 from the same starting point: how far float32
  # torch itself is from exact, i.e. the conditioning of train-mode BN here.
  model.load_state_dict({k_[3:]: torch.from_numpy(arrays[k_]) for k_ in arrays
                         if k_.startswith("sd/")})
  model.double()
  with torch.no_grad():
    q, k, q1, k1 = model(torch.from_numpy(views[0].transpose(0, 3, 1, 2)).double(),
                         torch.from_numpy(views[1].transpose(0, 3, 1, 2)).double(),
                         torch.from_numpy(rois).double())
  arrays.update(train64_q=q.numpy(), train64_k=k.numpy(),
                train64_q1=q1.numpy().reshape(BATCH, 4, -1),
                train64_k1=k1.numpy().reshape(BATCH, 4, -1))
  arrays.update({f"train64_sd/{k_}": v.detach().numpy().astype(np.float32)
                 for k_, v in model.state_dict().items()})
  # A fine-tuned DeepLabv3+ (decoder_ft with conv4, 6 classes): logits.
  ft = v3p_encoder_ft.build_model(num_classes=6, in_channels=BANDS, arch="resnet50")
  _randomise_bn(ft, rng)
  ft.eval()
  with torch.no_grad():
    logits = ft(torch.from_numpy(views[0].transpose(0, 3, 1, 2)))
  arrays.update({f"ft_sd/{k_}": v.detach().numpy() for k_, v in ft.state_dict().items()})
  arrays["ft_logits"] = logits.numpy().transpose(0, 2, 3, 1)
  np.savez(out, **arrays)
  print(f"wrote {out}: {len(arrays)} arrays")


def compare(path: str, tol: float, conv_impl: str) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_default_matmul_precision", "highest")
  from glc_jax import models  # pylint: disable=import-outside-toplevel
  from glc_jax.tools.import_torch import convert_state_dict  # pylint: disable=import-outside-toplevel

  data = np.load(path)
  sd = {k[3:]: data[k] for k in data.files if k.startswith("sd/")}
  variables, report = convert_state_dict(sd, "glcnet")
  print("\n".join(report))
  net = models.GLCNet(depth=50, output_stride=16, embed_dim=64, conv_impl=conv_impl)
  worst = 0.0
  results = {}
  for v in (0, 1):
    out, state = jax.jit(lambda var, x, b: net.apply(
        var, x, b, False, method="embed", mutable=["intermediates"]))(
            variables, data["views"][v], data["boxes"][v])
    inter = {k: val[0] for k, val in state["intermediates"].items()}
    for name in ("backbone_high", "backbone_low", "encoder", "decoder"):
      ours = inter[name if name.startswith("backbone") else f"{name}_out"]
      results[f"{name}/view{v + 1}"] = (ours, data[f"{name}/view{v + 1}"])
    results["global " + "qk"[v]] = (out["global"], data["qk"[v]])
    results["local " + ("q1", "k1")[v]] = (out["local"], data[("q1", "k1")[v]])
  train_net = models.GLCNet(depth=50, output_stride=16, embed_dim=64, encoder_dropout=0.0,
                            conv_impl=conv_impl)
  (o1, o2), updated = jax.jit(lambda var, v1, v2, b1, b2: train_net.apply(
      var, v1, v2, b1, b2, True, mutable=["batch_stats"]))(
          variables, data["views"][0], data["views"][1], data["boxes"][0], data["boxes"][1])
  # Train mode at batch 2 is ill-conditioned (BN over few values), so float32
  # results are judged against the float64 reference, next to the error of
  # the reference's own float32 run: ours must be no worse than twice that.
  after64 = {k[11:]: data[k] for k in data.files if k.startswith("train64_sd/")}
  stats64, _ = convert_state_dict(after64, "glcnet")
  after32 = {k[9:]: data[k] for k in data.files if k.startswith("train_sd/")}
  stats32, _ = convert_state_dict(after32, "glcnet")
  flat = lambda t: np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)])  # noqa: E731
  train_rows = {
      "q": (o1["global"], data["train_q"], data["train64_q"]),
      "k": (o2["global"], data["train_k"], data["train64_k"]),
      "q1": (o1["local"], data["train_q1"], data["train64_q1"]),
      "k1": (o2["local"], data["train_k1"], data["train64_k1"]),
      "running stats": (flat(updated["batch_stats"]), flat(stats32["batch_stats"]),
                        flat(stats64["batch_stats"])),
  }
  print(f"{'train mode':24s} {'ours vs f64':>12s} {'torch f32 vs f64':>17s}")
  train_ok = True
  for name, (ours, ref32, ref64) in train_rows.items():
    scale = np.abs(ref64).max()
    ours_err = np.abs(np.asarray(ours, np.float64) - ref64).max() / scale
    ref_err = np.abs(ref32 - ref64).max() / scale
    train_ok &= ours_err <= 2 * ref_err + 1e-6
    print(f"{name:24s} {ours_err:12.2e} {ref_err:17.2e}")
  ft_sd = {k[6:]: data[k] for k in data.files if k.startswith("ft_sd/")}
  ft_vars, ft_report = convert_state_dict(ft_sd, "deeplab")
  print("\n".join(ft_report))
  ft_net = models.DeepLabV3Plus(num_classes=6, depth=50, output_stride=16, conv_impl=conv_impl)
  results["fine-tune logits"] = (
      jax.jit(lambda var, x: ft_net.apply(var, x, False))(ft_vars, data["views"][0]),
      data["ft_logits"])
  print(f"{'output':24s} {'shape':>20s} {'max|err|/max|ref|':>18s} {'rel. Frobenius':>15s}")
  for name, (ours, ref) in results.items():
    ours = np.asarray(ours, np.float64)
    err_max = np.abs(ours - ref).max() / np.abs(ref).max()
    err_fro = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    worst = max(worst, err_max, err_fro)
    print(f"{name:24s} {str(ref.shape):>20s} {err_max:18.2e} {err_fro:15.2e}")
  print(f"worst relative error {worst:.2e} (tolerance {tol:.0e}); "
        f"train mode {'within' if train_ok else 'OUTSIDE'} the reference's own float32 error")
  return 0 if worst <= tol and train_ok else 1


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="stage", required=True)
  ex = sub.add_parser("export")
  ex.add_argument("ref_dir")
  ex.add_argument("out")
  cmp_ = sub.add_parser("compare")
  cmp_.add_argument("npz")
  cmp_.add_argument("--tol", type=float, default=1e-5)
  cmp_.add_argument("--conv-impl", default="plain", choices=["plain", "cpu"])
  args = parser.parse_args()
  if args.stage == "export":
    export(args.ref_dir, args.out)
    return 0
  return compare(args.npz, args.tol, args.conv_impl)


if __name__ == "__main__":
  sys.exit(main())
