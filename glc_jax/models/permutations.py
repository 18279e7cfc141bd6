"""Deterministic jigsaw permutation set with maximal Hamming distance."""
from __future__ import annotations

import functools
import itertools

import numpy as np


@functools.lru_cache(maxsize=4)
def jigsaw_permutations(count: int = 1000, tiles: int = 9) -> np.ndarray:
  """`count` permutations of range(tiles) chosen greedily far apart.

  Noroozi & Favaro's maximal-Hamming-distance selection, made deterministic:
  start from the identity, then repeatedly add the permutation whose minimum
  Hamming distance to those already chosen is largest (ties: the first in
  lexicographic order). Returns (count, tiles) int32; row k is the order in
  which tiles are shown for class k (tile j of the puzzle is source tile
  perm[j]). Takes a few seconds for 1000 of 9 (cached per process).
  """
  if not 1 <= count <= np.prod(np.arange(1, tiles + 1)):
    raise ValueError(f"jigsaw_permutations: cannot choose {count} of {tiles}! permutations")
  pool = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)
  chosen = [0]
  min_dist = np.sum(pool != pool[0], axis=1, dtype=np.int8)
  for _ in range(count - 1):
    nxt = int(np.argmax(min_dist))
    chosen.append(nxt)
    np.minimum(min_dist, np.sum(pool != pool[nxt], axis=1, dtype=np.int8), out=min_dist)
  return pool[chosen].astype(np.int32)


def load_permutations(path: str, tiles: int = 9) -> np.ndarray:
  """A permutation set stored as an (N, tiles) integer `.npy` file, as (N, tiles) int32.

  Rows may count tiles from 0 or from 1 (shifted to 0, as the reference's loader
  does with its permutations_1000.npy); every row must be a permutation of the
  tiles. Raises ValueError naming the file and what is wrong.
  """
  try:
    perms = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"jigsaw permutations {path}: cannot read a .npy array ({e})") from None
  if perms.ndim != 2 or perms.shape[1] != tiles or not np.issubdtype(perms.dtype, np.integer):
    raise ValueError(f"jigsaw permutations {path}: expected an (N, {tiles}) integer array, "
                     f"got {perms.shape} {perms.dtype}")
  if perms.size and perms.min() == 1:
    perms = perms - 1
  bad = np.flatnonzero(np.any(np.sort(perms, axis=1) != np.arange(tiles), axis=1))
  if bad.size:
    raise ValueError(f"jigsaw permutations {path}: row {bad[0]} ({perms[bad[0]].tolist()}) "
                     f"is not a permutation of 0..{tiles - 1}")
  return perms.astype(np.int32)
