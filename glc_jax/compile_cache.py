"""JAX's persistent compilation cache, shared by every entry point.

The full train step takes minutes to compile for a TPU and tens of seconds
on a CPU (docs/benchmarks.md); with the cache, a resumed run, a rerun or a
second run of the same shapes and model skips that. Where it lives, first
that applies: the JAX_COMPILATION_CACHE_DIR environment variable (the
user's own setting, left alone), the directory the caller passes (train.py:
`--compilation_cache=DIR`, default `<workdir>/jax_cache`), or nowhere when
that is "none".
"""
from __future__ import annotations

import os
import pathlib

import jax

# Functions that compile faster than this are not worth a disk entry.
MIN_COMPILE_SECONDS = 0.5


def enable(directory: str | os.PathLike) -> str | None:
  """Turns the cache on in `directory`; returns the directory in use, or None."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if str(directory) == "none":
    return None
  path = str(pathlib.Path(directory).absolute())
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  return path
