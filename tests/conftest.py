"""Test set-up: 8 virtual CPU devices, so every sharded path runs in CI.

XLA_FLAGS must be set before jax is first imported, which is why this happens at
module import time rather than in a fixture.
"""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tiny network settings shared by tests so that compiled functions are reused.
TINY_IMAGE_SIZE = 64
TINY_BANDS = 4


@pytest.fixture(scope="session")
def devices():
  assert jax.device_count() == 8, "tests expect 8 virtual CPU devices"
  return jax.devices()
