"""GLCNet train-step throughput and contrastive-loss memory.

  python benchmarks/bench_step.py step --size 128 --pairs 4        # our step
  python benchmarks/bench_step.py step --size 128 --xla-flags=--xla_cpu_use_onednn=true
  python benchmarks/bench_step.py step --size 128 --conv-impl plain  # lax.conv for every conv
  python benchmarks/bench_step.py memory --devices 8 --global-batch 4096
  python benchmarks/bench_step.py reference --reference PATH/T-SS-GLCNet \\
      --torch-python PATH/bin/python --size 128 --pairs 4         # PyTorch reference
  python benchmarks/bench_step.py all --reference ... --torch-python ...

`step` times the full GLCNet pretraining step (ResNet-50 DeepLabv3+, both
views, global + local NT-Xent, Adam update) on ONE device of the default
backend; it prints the compile time, the median step time over --steps
timed steps after --warmup steps, pairs/s, the step's FLOPs from XLA's cost
analysis, and MFU when --peak-tflops is given.

`memory` compiles loss + gradient of the global NT-Xent for a global batch
on a mesh of --devices virtual devices in two formulations: 'gathered' (this
project: local rows x all-gathered columns) and 'full-matrix' (every device
builds the global (2N, 2N) similarity matrix from all-gathered embeddings),
and prints XLA's per-device memory analysis.

`reference` runs the reference PyTorch GLCNet step (models/GLCNet.py with
its NTXentLoss and torch Adam) from a user-given checkout with a user-given
Python that has torch and torchvision; nothing of it is imported here.

Each mode prints one JSON line; `all` runs the modes in subprocesses (XLA
flags and device counts are per process) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _parse():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("mode", choices=["step", "memory", "reference", "all"])
  p.add_argument("--size", type=int, default=128, help="view side in pixels")
  p.add_argument("--pairs", type=int, default=4, help="pairs per step")
  p.add_argument("--patch", type=int, default=0,
                 help="patch side (default: size // 4, at least 16)")
  p.add_argument("--patches", type=int, default=4, help="patches per pair")
  p.add_argument("--bands", type=int, default=4)
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"])
  p.add_argument("--conv-impl", default="auto", choices=["auto", "plain", "cpu"],
                 help="model.conv_impl (auto: cpu kernels on CPU, plain elsewhere)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=0,
                 help="reference: torch threads (default: all cores)")
  p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
  p.add_argument("--devices", type=int, default=8,
                 help="memory: virtual CPU devices")
  p.add_argument("--global-batch", type=int, default=4096)
  p.add_argument("--embed-dim", type=int, default=64)
  p.add_argument("--peak-tflops", type=float, default=0.0,
                 help="device peak for MFU (e.g. 989 for H100 bf16 dense)")
  p.add_argument("--reference", default="", help="path of T-SS-GLCNet")
  p.add_argument("--torch-python", default="",
                 help="python with torch + torchvision for --reference")
  return p.parse_args()


def _patch(args):
  return args.patch or max(16, args.size // 4)


def _synthetic_batch(args, np):
  rng = np.random.default_rng(0)
  b, s, p, k = args.pairs, args.size, args.patches, _patch(args)

  def boxes():
    y = rng.integers(0, s - k + 1, (b, p))
    x = rng.integers(0, s - k + 1, (b, p))
    return np.stack([y, x, y + k, x + k], -1).astype(np.int32)
  views = rng.uniform(-1.6, 1.6, (2, b, s, s, args.bands)).astype(np.float32)
  return dict(view1=views[0], view2=views[1], patch_boxes1=boxes(),
              patch_boxes2=boxes(), patch_valid=np.ones((b, p), bool))


def bench_step(args):
  import jax
  import ml_collections
  import numpy as np

  from glc_jax import methods, optim, parallel

  mesh = parallel.make_data_mesh(jax.devices()[:1])
  config = ml_collections.ConfigDict(dict(
      method="glcnet", model=dict(depth=args.depth, dtype=args.dtype,
                                  conv_impl=args.conv_impl)))
  method = methods.create_method(config)
  tx, schedule = optim.build_optimizer(None, steps_per_epoch=1000, num_epochs=1)
  host_batch = _synthetic_batch(args, np)
  state = methods.init_train_state(method, tx, mesh, jax.random.key(0),
                                   host_batch)
  step = methods.make_train_step(method, tx, schedule, mesh)
  batch = parallel.shard_host_batch(host_batch, mesh)
  rng = parallel.replicate(jax.random.key(1), mesh)

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  times = []
  for i in range(args.warmup + args.steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics["loss"])
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  out = dict(mode="step", backend=jax.default_backend(),
             device=str(jax.devices()[0].device_kind), size=args.size,
             pairs=args.pairs, patch=_patch(args), dtype=args.dtype,
             conv_impl=args.conv_impl,
             xla_flags=args.xla_flags, compile_s=round(compile_s, 1),
             step_s=round(median, 3), step_s_min=round(min(times), 3),
             pairs_per_s=round(args.pairs / median, 3),
             gflop_per_pair=round(flops / args.pairs / 1e9, 1),
             loss=float(metrics["loss"]))
  if args.peak_tflops and flops:
    out["mfu"] = round(flops / median / (args.peak_tflops * 1e12), 3)
  return out


def bench_memory(args):

  import jax
  import jax.numpy as jnp

  from glc_jax import losses, parallel
  from glc_jax.parallel import DATA_AXIS

  mesh = parallel.make_data_mesh()
  n, d = args.global_batch, args.embed_dim
  z = jax.ShapeDtypeStruct((n, d), jnp.float32,
                           sharding=parallel.batch_sharding(mesh))

  def gathered(z1, z2):
    return losses.ntxent_loss(z1, z2, axis_name=DATA_AXIS)

  def full_matrix(z1, z2):
    # Every device materialises the global problem.
    z1 = jax.lax.all_gather(z1, DATA_AXIS, tiled=True)
    z2 = jax.lax.all_gather(z2, DATA_AXIS, tiled=True)
    return jax.lax.pmean(losses.ntxent_loss(z1, z2), DATA_AXIS)

  out = dict(mode="memory", devices=mesh.size, global_batch=n, embed_dim=d)
  for name, fn in [("gathered", gathered), ("full_matrix", full_matrix)]:
    grad = jax.value_and_grad(fn, argnums=(0, 1))
    mapped = jax.jit(jax.shard_map(
        grad, mesh=mesh, in_specs=(parallel.BATCH_SPEC,) * 2,
        out_specs=(parallel.REPLICATED_SPEC, (parallel.BATCH_SPEC,) * 2)))
    mem = mapped.lower(z, z).compile().memory_analysis()
    out[f"{name}_temp_mib"] = round(mem.temp_size_in_bytes / 2**20, 1)
    out[f"{name}_peak_mib"] = round(
        (mem.temp_size_in_bytes + mem.argument_size_in_bytes
         + mem.output_size_in_bytes - mem.alias_size_in_bytes) / 2**20, 1)
  return out


# Runs in the reference's environment (torch); uses the reference checkout's
# own modules, so that what is timed is the reference's code.
_REFERENCE_SCRIPT = r"""
import json, statistics, sys, time
import numpy as np, torch
ref, size, pairs, patches, patch, bands, warmup, steps, threads = sys.argv[1:10]
size, pairs, patches, patch, bands, warmup, steps, threads = map(
    int, (size, pairs, patches, patch, bands, warmup, steps, threads))
sys.path.insert(0, ref)
if threads:
  torch.set_num_threads(threads)
import importlib.util
from models import GLCNet
# utils/__init__ pulls in the data pipeline (cv2, ...); load the loss alone.
spec = importlib.util.spec_from_file_location("contrast_loss",
                                              ref + "/utils/contrast_loss.py")
contrast_loss = importlib.util.module_from_spec(spec)
spec.loader.exec_module(contrast_loss)
torch.manual_seed(0)
model = GLCNet.build_model(num_classes=64, in_channels=bands, arch="resnet50",
                           patch_num=patches, patch_size=patch)
model.train()
crit = [contrast_loss.NTXentLoss(pairs, None, 0.5, cos_sim=True, use_gpu=False),
        contrast_loss.NTXentLoss(pairs * patches, None, 0.5, cos_sim=True,
                                 use_gpu=False)]
opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5,
                       betas=(0.9, 0.99))
rng = np.random.default_rng(0)
x1 = torch.from_numpy(rng.uniform(-1.6, 1.6, (pairs, bands, size, size)).astype(np.float32))
x2 = torch.from_numpy(rng.uniform(-1.6, 1.6, (pairs, bands, size, size)).astype(np.float32))
# rois[b, p] = (idx, x1, y1, x2, y2) for view 1 then the same for view 2.
lo = rng.integers(0, size - patch, (pairs, patches, 2, 2)).astype(np.float32)
rois = np.zeros((pairs, patches, 10), np.float32)
for v in range(2):
  rois[..., 5 * v + 1:5 * v + 3] = lo[:, :, v]
  rois[..., 5 * v + 3:5 * v + 5] = lo[:, :, v] + patch - 1
rois = torch.from_numpy(rois)
times = []
for i in range(warmup + steps):
  t0 = time.perf_counter()
  opt.zero_grad()
  q, k, q1, k1 = model(x1, x2, rois.clone())
  loss = 0.5 * crit[0](q, k) + 0.5 * crit[1](q1, k1)
  loss.backward()
  opt.step()
  if i >= warmup:
    times.append(time.perf_counter() - t0)
med = statistics.median(times)
print(json.dumps(dict(mode="reference", torch=torch.__version__,
                      threads=torch.get_num_threads(), size=size, pairs=pairs,
                      patch=patch, step_s=round(med, 3),
                      step_s_min=round(min(times), 3),
                      pairs_per_s=round(pairs / med, 3), loss=float(loss))))
"""


def bench_reference(args):
  if not (args.reference and args.torch_python):
    raise SystemExit("reference mode needs --reference and --torch-python")
  cmd = [args.torch_python, "-c", _REFERENCE_SCRIPT, args.reference,
         str(args.size), str(args.pairs), str(args.patches), str(_patch(args)),
         str(args.bands), str(args.warmup), str(args.steps), str(args.threads)]
  done = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f"reference step failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def _run_sub(argv, xla_flags="", devices=0):
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if devices:
    flags += f" --xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = (flags + " " + xla_flags).strip()
  done = subprocess.run([sys.executable, __file__] + argv, env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    return dict(mode=argv[0], error=done.stderr.strip().splitlines()[-1:])
  return json.loads(done.stdout.strip().splitlines()[-1])


def bench_all(args):
  common = ["--pairs", str(args.pairs), "--warmup", str(args.warmup),
            "--steps", str(args.steps), "--depth", str(args.depth),
            "--dtype", args.dtype, "--conv-impl", args.conv_impl,
            "--peak-tflops", str(args.peak_tflops)]
  rows = []
  for size in (128, 224):
    rows.append(_run_sub(["step", "--size", str(size)] + common,
                         xla_flags=args.xla_flags))
    if args.reference:
      rows.append(bench_reference(argparse.Namespace(**{**vars(args),
                                                        "size": size})))
  rows.append(_run_sub(["memory", "--global-batch", str(args.global_batch),
                        "--embed-dim", str(args.embed_dim)],
                       devices=args.devices))
  print(f"machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores")
  for row in rows:
    print(json.dumps(row))


def main():
  args = _parse()
  if args.mode in ("step", "memory") and args.xla_flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                               + args.xla_flags).strip()
  if args.mode == "memory" and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
  if args.mode == "all":
    bench_all(args)
    return
  fn = dict(step=bench_step, memory=bench_memory, reference=bench_reference)
  print(json.dumps(fn[args.mode](args)))


if __name__ == "__main__":
  main()
