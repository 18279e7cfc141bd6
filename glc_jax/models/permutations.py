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
