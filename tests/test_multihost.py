"""Two processes x two CPU devices (jax.distributed over localhost, gloo
collectives) take the same GLCNet step as one process with four devices.

The file is also the worker: `python test_multihost.py worker PORT ID OUT`.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

GLOBAL_BATCH = 8
IMAGE = 32
PATCHES = 4
PATCH = 8
LR = 0.5
CONFIG = dict(method="glcnet", model=dict(depth=18, width=0.125, embed_dim=16))


def _batch():
  rng = np.random.default_rng(0)

  def boxes():
    y = rng.integers(0, IMAGE - PATCH, (GLOBAL_BATCH, PATCHES))
    x = rng.integers(0, IMAGE - PATCH, (GLOBAL_BATCH, PATCHES))
    return np.stack([y, x, y + PATCH, x + PATCH], -1).astype(np.int32)
  shape = (GLOBAL_BATCH, IMAGE, IMAGE, 4)
  valid = rng.random((GLOBAL_BATCH, PATCHES)) > 0.25
  valid[:, 0] = True
  return dict(view1=rng.normal(size=shape).astype(np.float32),
              view2=rng.normal(size=shape).astype(np.float32),
              patch_boxes1=boxes(), patch_boxes2=boxes(), patch_valid=valid)


def _one_step(devices, process_slice):
  """Init + one SGD step of CONFIG on a mesh of `devices`; host numpy results.

  process_slice: (start, stop) rows of the global batch this process feeds.
  As in test_steps.py: dropout is off (its masks are drawn per device), and
  ReLU / max-pool become softplus / average pooling so that no gate sits
  within rounding of its kink.
  """
  import contextlib
  from unittest import mock

  import flax.linen as nn
  import jax
  import ml_collections
  import optax

  from glc_jax import methods, parallel
  from glc_jax.models import resnet

  def no_dropout(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dropout):
      return args[0]
    return next_fun(*args, **kwargs)

  smooth = contextlib.ExitStack()
  smooth.enter_context(mock.patch.object(nn, "relu", jax.nn.softplus))
  smooth.enter_context(mock.patch.object(
      resnet, "max_pool",
      lambda x, k, s, p, *_: nn.avg_pool(x, (k, k), strides=(s, s), padding=((p, p),) * 2)))
  smooth.enter_context(nn.intercept_methods(no_dropout))

  mesh = parallel.make_data_mesh(devices)
  method = methods.create_method(ml_collections.ConfigDict(CONFIG))
  tx = optax.sgd(LR)
  batch = _batch()
  step = methods.make_train_step(method, tx, lambda s: LR, mesh)
  local = {k: v[slice(*process_slice)] for k, v in batch.items()}
  with smooth:
    state = methods.init_train_state(method, tx, mesh, jax.random.key(0),
                                     batch)
    state, metrics = step(state, parallel.shard_host_batch(local, mesh),
                          jax.random.key(1))
  # Replicated values: every process holds the whole array on each device.
  host = lambda x: np.asarray(x.addressable_data(0))
  leaves = jax.tree.leaves((state.params, state.batch_stats))
  return {k: host(v) for k, v in metrics.items()}, [host(x) for x in leaves]


def _worker(port, process_id, out_path):
  from glc_jax import parallel
  parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")  # as conftest
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  half = GLOBAL_BATCH // 2
  metrics, leaves = _one_step(
      jax.devices(), (process_id * half, (process_id + 1) * half))
  np.savez(out_path, **{f"metric_{k}": v for k, v in metrics.items()},
           **{f"leaf_{i}": v for i, v in enumerate(leaves)})


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(devices, tmp_path):
  # not at the top: the worker must not import conftest
  from conftest import assert_tree_close, child_xla_flags
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=child_xla_flags(2))
  procs = [subprocess.Popen(
      [sys.executable, __file__, "worker", str(port), str(i),
       str(tmp_path / f"out{i}.npz")], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=420)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]

  want_metrics, want_leaves = _one_step(devices[:4], (0, GLOBAL_BATCH))
  for i in range(2):
    got = np.load(tmp_path / f"out{i}.npz")
    for k, v in want_metrics.items():
      np.testing.assert_allclose(got[f"metric_{k}"], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert_tree_close([got[f"leaf_{j}"] for j in range(len(want_leaves))], want_leaves,
                      f"process {i} params and batch_stats")


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
