"""FLOP counter against closed-form counts."""
import jax
import jax.numpy as jnp
import numpy as np

from glc_jax import flops, models


def test_matmul_and_conv_counts_match_closed_form():
  a = jax.ShapeDtypeStruct((8, 32), jnp.float32)
  b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
  assert flops.analytic_flops(jnp.matmul, a, b) == 2 * 8 * 32 * 16
  conv = models.Conv2d(5, 3, stride=2, padding=2, dilation=2)
  x = jnp.zeros((2, 13, 11, 3))
  v = conv.init(jax.random.key(0), x)
  # Output 2 × 7 × 6 × 5, each a 3·3·3 window.
  assert flops.analytic_flops(conv.apply, v, x) == 2 * (2 * 7 * 6 * 5) * (3 * 3 * 3)


def test_backward_of_conv_is_twice_forward_and_scan_multiplies():
  conv = models.Conv2d(8, 3, padding=1)
  x = jnp.zeros((2, 16, 16, 4))
  v = conv.init(jax.random.key(0), x)
  fwd = flops.analytic_flops(conv.apply, v, x)
  loss = lambda v, x: jnp.sum(conv.apply(v, x))  # noqa: E731
  both = flops.analytic_flops(jax.grad(loss, argnums=(0, 1)), v, x)
  assert both == 3 * fwd  # forward + input gradient + weight gradient

  def body(c, _):
    return c @ jnp.eye(4), None
  scanned = lambda c: jax.lax.scan(body, c, None, length=5)[0]  # noqa: E731
  assert flops.analytic_flops(scanned, jnp.zeros((3, 4))) == 5 * 2 * 3 * 4 * 4


def test_compiled_cost_analysis_agrees_on_a_matmul():
  a, b = jnp.ones((64, 128)), jnp.ones((128, 32))
  got = flops.compiled_flops(jnp.matmul, a, b)
  if got is not None:  # some backends report no FLOPs
    np.testing.assert_allclose(got, 2 * 64 * 128 * 32, rtol=0.05)
