"""Pretraining and segmentation losses, exact over the global batch.

Every loss takes an optional `axis_name`. With `axis_name=None` it is an
ordinary function of its (whole-batch) arguments. Inside `jax.shard_map` over
that axis (with the default `check_vma=True`), each device passes its local
slice of the batch and gets back the loss over the GLOBAL batch, the same
value on every device: contrastive losses draw their negatives from all
devices through `all_gather`, and means are taken as psum(sum) / psum(count).
Differentiating that value on each device and letting shard_map sum the
gradients of the replicated parameters (the transpose of their implicit
broadcast) gives exactly the gradient of the single-device loss.

Embeddings are cast to float32 before any similarity is formed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# torch.nn.functional.normalize's floor on the norm.
_NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12) along `axis`, in float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _NORM_EPS)


def _global_mean(local_sum: jax.Array, local_count: jax.Array,
                 axis_name: str | None) -> jax.Array:
  """sum / count over all devices; 0 where nothing was counted."""
  if axis_name is not None:
    local_sum = jax.lax.psum(local_sum, axis_name)
    local_count = jax.lax.psum(local_count, axis_name)
  return local_sum / jnp.maximum(local_count, 1)


def ntxent_loss(z1: jax.Array, z2: jax.Array, *, temperature: float = 0.5,
                valid: jax.Array | None = None, axis_name: str | None = None,
                gather_negatives: bool = True, eps: float = 1e-8) -> jax.Array:
  """NT-Xent with cosine similarity, as the GLCNet reference defines it.

  For each of the 2N embeddings e_i (N = global batch, views stacked as
  [z1; z2]), with s(a, b) = cos(a, b) / temperature:

    l_i = -log( exp(s(e_i, e_partner(i))) /
                (sum_{j not in {i, partner(i)}} exp(s(e_i, e_j)) + eps) )

  and the loss is the mean of l_i over the 2N embeddings. The positive is NOT
  part of the denominator.

  Under shard_map each device forms its local rows against the all-gathered
  columns, an (2n, 2N) similarity block for n local pairs; the global
  (2N, 2N) matrix is never built. Positives and self-similarities are located
  from the device index. Gradients flow back through the gather.

  Args:
    z1, z2: (n, D) embeddings of the two views of this device's n pairs; any
      float dtype (computed in float32).
    temperature: tau.
    valid: optional (n,) bool; an invalid pair is neither an anchor nor a
      negative for anyone (used for unmatched patches).
    axis_name: mesh axis to gather negatives and average over, or None.
    gather_negatives: False keeps each device's negatives local (the
      reference's multi-GPU behaviour); the result is then the mean over
      devices of each device's own NT-Xent.
    eps: added to the denominator, as in the reference.

  Returns:
    scalar float32 loss, identical on every device of the axis.
  """
  if z1.shape != z2.shape or z1.ndim != 2:
    raise ValueError(f"ntxent_loss expects two (n, D) arrays of equal shape, "
                     f"got {z1.shape} and {z2.shape}")
  n = z1.shape[0]
  z1, z2 = l2_normalize(z1), l2_normalize(z2)
  if valid is None:
    valid = jnp.ones((n,), bool)
  gather = axis_name is not None and gather_negatives
  if gather:
    cols1 = jax.lax.all_gather(z1, axis_name, tiled=True)
    cols2 = jax.lax.all_gather(z2, axis_name, tiled=True)
    col_valid = jax.lax.all_gather(valid, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  else:
    cols1, cols2, col_valid, offset = z1, z2, valid, 0
  n_cols = cols1.shape[0]

  rows = jnp.concatenate([z1, z2])                        # (2n, D)
  cols = jnp.concatenate([cols1, cols2])                  # (2N, D)
  logits = rows @ cols.T / temperature                    # (2n, 2N)

  own = offset + jnp.arange(n)                            # global pair ids
  self_col = jnp.concatenate([own, own + n_cols])
  partner_col = jnp.concatenate([own + n_cols, own])
  col_ids = jnp.arange(2 * n_cols)
  negative = ((col_ids[None] != self_col[:, None])
              & (col_ids[None] != partner_col[:, None])
              & jnp.concatenate([col_valid, col_valid])[None])

  # log(sum_neg exp(logit) + eps), shifted by the row max for stability.
  shift = jax.lax.stop_gradient(
      jnp.max(jnp.where(negative, logits, -jnp.inf), axis=1, keepdims=True))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)
  neg_sum = jnp.sum(jnp.where(negative, jnp.exp(logits - shift), 0.0), axis=1)
  log_denominator = jnp.log(neg_sum + eps * jnp.exp(-shift[:, 0])) + shift[:, 0]
  positive = jnp.sum(z1 * z2, axis=1) / temperature
  per_row = log_denominator - jnp.concatenate([positive, positive])

  row_valid = jnp.concatenate([valid, valid]).astype(jnp.float32)
  local_sum = jnp.sum(per_row * row_valid)
  local_count = jnp.sum(row_valid)
  if gather or axis_name is None:
    return _global_mean(local_sum, local_count, axis_name)
  return jax.lax.pmean(local_sum / jnp.maximum(local_count, 1), axis_name)


def embedding_health(z1: jax.Array, z2: jax.Array, name: str, *,
                     valid: jax.Array | None = None,
                     axis_name: str | None = None) -> dict[str, jax.Array]:
  """Collapse signals of two views' embeddings over the global batch (no gradient).

  Returns {f'embed_std_{name}', f'cos_pos_{name}', f'cos_neg_{name}'}; with
  e the L2-normalised embeddings of the valid pairs of both views (2N' of
  them over all devices):
    embed_std: the per-dimension standard deviation of e over the 2N' rows
               (population), averaged over the dimensions: about 1/sqrt(D)
               for embeddings spread over the sphere, 0 when every row is
               the same;
    cos_pos:   mean cos(e1_i, e2_i) over the N' pairs;
    cos_neg:   mean cos(e_a, e_b) over the 2N'(2N'-2) ordered pairs that are
               neither the same row nor partners (NT-Xent's negatives).
  cos_neg comes from the sum S of all rows: S·S sums e_a·e_b over every
  ordered pair, so no (2N, 2N) matrix is formed. Computed in float32, the
  same value on every device of `axis_name`.

  Args:
    z1, z2: (n, D) this device's embeddings of the two views.
    name: the metrics' suffix ('global', 'local').
    valid: optional (n,) bool; invalid pairs do not count.
    axis_name: mesh axis to reduce over, or None.
  """
  z1 = jax.lax.stop_gradient(l2_normalize(z1))
  z2 = jax.lax.stop_gradient(l2_normalize(z2))
  weight = (jnp.ones(z1.shape[:1], jnp.float32) if valid is None
            else valid.astype(jnp.float32))[:, None]

  def total(x):
    return x if axis_name is None else jax.lax.psum(x, axis_name)

  pairs = total(jnp.sum(weight))
  rows = 2 * pairs
  row_sum = total(jnp.sum(weight * (z1 + z2), axis=0))                   # (D,)
  mean = row_sum / jnp.maximum(rows, 1)
  # Deviations from the mean, not E[e²] − E[e]², so that a collapse reads 0, not rounding noise.
  spread = total(jnp.sum(weight * ((z1 - mean) ** 2 + (z2 - mean) ** 2), axis=0))
  std = jnp.mean(jnp.sqrt(spread / jnp.maximum(rows, 1)))
  positive = total(jnp.sum(weight * z1 * z2))
  self_dots = total(jnp.sum(weight * (z1 * z1 + z2 * z2)))
  negatives = rows * (rows - 2)
  cos_neg = (jnp.dot(row_sum, row_sum) - self_dots - 2 * positive) / jnp.maximum(negatives, 1)
  return {f"embed_std_{name}": std, f"cos_pos_{name}": positive / jnp.maximum(pairs, 1),
          f"cos_neg_{name}": cos_neg}


def glcnet_loss(global1: jax.Array | None, global2: jax.Array | None,
                local1: jax.Array | None, local2: jax.Array | None,
                patch_valid: jax.Array | None, *, weight: float = 0.5,
                temperature: float = 0.5, axis_name: str | None = None,
                gather_negatives: bool = True,
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GLCNet loss: weight * global NT-Xent + (1 - weight) * local NT-Xent.

  Ablations follow the reference: with the global embeddings absent
  (noGlobal) the loss is the local NT-Xent alone, with the local ones absent
  (noLocal) the global NT-Xent alone; neither is scaled by `weight` then.

  Args:
    global1, global2: (n, D) style embeddings of the two views, or None.
    local1, local2: (n, P, D') matched-patch embeddings, or None. The local
      NT-Xent treats all n*P patches of the global batch as its batch.
    patch_valid: (n, P) bool, patches that exist in both views.
    weight: lambda.
    temperature, axis_name, gather_negatives: as in `ntxent_loss`.

  Returns:
    (loss, {'loss_global': ..., 'loss_local': ...}) with the parts present.
  """
  use_global = global1 is not None
  use_local = local1 is not None
  if not (use_global or use_local):
    raise ValueError("glcnet_loss needs the global or the local embeddings")
  parts = {}
  kwargs = dict(temperature=temperature, axis_name=axis_name,
                gather_negatives=gather_negatives)
  if use_global:
    parts["loss_global"] = ntxent_loss(global1, global2, **kwargs)
  if use_local:
    n, p, d = local1.shape
    valid = None if patch_valid is None else patch_valid.reshape(n * p)
    parts["loss_local"] = ntxent_loss(
        local1.reshape(n * p, d), local2.reshape(n * p, d), valid=valid,
        **kwargs)
  if use_global and use_local:
    loss = weight * parts["loss_global"] + (1 - weight) * parts["loss_local"]
  else:
    loss = next(iter(parts.values()))
  return loss, parts


def moco_infonce_loss(q: jax.Array, k: jax.Array, queue: jax.Array, *,
                      temperature: float = 0.07,
                      axis_name: str | None = None) -> jax.Array:
  """MoCo v2 InfoNCE: the positive key against the queue of negatives.

  Args:
    q: (n, D) query embeddings (normalised here).
    k: (n, D) key embeddings from the momentum encoder (normalised here; no
      gradient flows into them).
    queue: (K, D) unit-norm negative keys, the same on every device.
    temperature: T.
    axis_name: mesh axis to average over, or None.

  Returns:
    scalar float32 cross-entropy with the positive as class 0, averaged over
    the global batch.
  """
  q = l2_normalize(q)
  k = jax.lax.stop_gradient(l2_normalize(k))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  positive = jnp.sum(q * k, axis=1, keepdims=True)
  logits = jnp.concatenate([positive, q @ queue.T], axis=1) / temperature
  per_row = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  return _global_mean(jnp.sum(per_row), jnp.float32(q.shape[0]), axis_name)


def enqueue_keys(queue: jax.Array, queue_ptr: jax.Array, keys: jax.Array, *,
                 axis_name: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Replaces the oldest queue entries by this step's keys from all devices.

  Every device gathers the same global keys in device order, so the queue
  stays identical everywhere. Per-device queues (the reference's: one per GPU,
  fed by that GPU's keys alone) are a (N, K, D) queue, row d device d's; every
  device holds all N so that the state stays replicated, and queue d receives
  device d's keys only.

  Args:
    queue: (K, D) float32, or (N, K, D) per-device queues (N = devices on
      axis_name, 1 without one).
    queue_ptr: () int32, index of the oldest entry.
    keys: (n, D) this device's keys (normalised here).
    axis_name: mesh axis to gather over, or None.

  Returns:
    (new queue, new pointer).
  """
  keys = jax.lax.stop_gradient(l2_normalize(keys))
  if queue.ndim == 3:
    return _enqueue_per_device(queue, queue_ptr, keys, axis_name)
  if axis_name is not None:
    # Invariant result: the type system then knows every device holds the
    # same queue, which lets the state leave shard_map replicated.
    keys = jax.lax.all_gather(keys, axis_name, tiled=True, to="invarying")
  size, batch = queue.shape[0], keys.shape[0]
  if size % batch:
    raise ValueError(f"MoCo queue size {size} is not a multiple of the global "
                     f"batch size {batch}")
  queue = jax.lax.dynamic_update_slice(
      queue, keys.astype(queue.dtype), (queue_ptr, jnp.int32(0)))
  return queue, (queue_ptr + batch) % size


def _enqueue_per_device(queues, queue_ptr, keys, axis_name):
  if axis_name is not None:
    keys = jax.lax.all_gather(keys, axis_name, to="invarying")
  else:
    keys = keys[None]
  if keys.shape[0] != queues.shape[0]:
    raise ValueError(f"MoCo per-device queues: the state holds {queues.shape[0]} queues "
                     f"but the step runs on {keys.shape[0]} devices")
  size, batch = queues.shape[1], keys.shape[1]
  if size % batch:
    raise ValueError(f"MoCo queue size {size} is not a multiple of the per-device "
                     f"batch size {batch}")
  queues = jax.lax.dynamic_update_slice(
      queues, keys.astype(queues.dtype), (jnp.int32(0), queue_ptr, jnp.int32(0)))
  return queues, (queue_ptr + batch) % size


def own_queue(queues: jax.Array, axis_name: str | None = None) -> jax.Array:
  """This device's (K, D) queue of (N, K, D) per-device queues."""
  if axis_name is None:
    return queues[0]
  return queues[jax.lax.axis_index(axis_name)]


def inpainting_loss(prediction: jax.Array, target: jax.Array,
                    erased: jax.Array, *, erased_weight: float = 0.99,
                    axis_name: str | None = None,
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted reconstruction loss of the inpainting pretext task.

  loss = w * MSE over erased elements + (1 - w) * MSE over kept elements,
  each a mean over (pixel, band) elements of the global batch, as in the
  reference.

  Args:
    prediction, target: (n, H, W, C).
    erased: (n, H, W) bool, True where the input was erased.
    erased_weight: w.
    axis_name: mesh axis to average over, or None.

  Returns:
    (loss, {'loss_erased': ..., 'loss_kept': ...}).
  """
  squared = jnp.square(prediction.astype(jnp.float32)
                       - target.astype(jnp.float32))
  bands = squared.shape[-1]
  mask = erased.astype(jnp.float32)[..., None]
  erased_part = _global_mean(jnp.sum(squared * mask),
                             jnp.sum(mask) * bands, axis_name)
  kept_part = _global_mean(jnp.sum(squared * (1 - mask)),
                           jnp.sum(1 - mask) * bands, axis_name)
  loss = erased_weight * erased_part + (1 - erased_weight) * kept_part
  return loss, {"loss_erased": erased_part, "loss_kept": kept_part}


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, *,
                       ignore_index: int | None = None,
                       axis_name: str | None = None) -> jax.Array:
  """Softmax cross-entropy averaged over the non-ignored labels of the global batch.

  Args:
    logits: (..., num_classes) float.
    labels: (...) int class indices; `ignore_index` entries do not count.
    ignore_index: label value to skip (255 for segmentation), or None.
    axis_name: mesh axis to average over, or None.

  Returns:
    scalar float32.
  """
  logits = logits.astype(jnp.float32)
  keep = (jnp.ones(labels.shape, bool) if ignore_index is None
          else labels != ignore_index)
  safe = jnp.where(keep, labels, 0)
  per = (jax.nn.logsumexp(logits, axis=-1)
         - jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0])
  keep = keep.astype(jnp.float32)
  return _global_mean(jnp.sum(per * keep), jnp.sum(keep), axis_name)
