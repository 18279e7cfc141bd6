"""Assigning scenes to splits, and nested labelled subsets within a split."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from data_prep.errors import DataPrepError
from data_prep.scenes import Scene

DEFAULT_SUBSET_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)


def parse_fractions(text: str) -> dict[str, float]:
  """'train=0.7,val=0.1,test=0.2' → {'train': 0.7, 'val': 0.1, 'test': 0.2}."""
  out = {}
  for item in text.split(","):
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise DataPrepError(f"{item!r} must be SPLIT=FRACTION")
    try:
      out[key] = float(value)
    except ValueError:
      raise DataPrepError(f"{item!r}: fraction must be a number") from None
  return out


def _read_list(path: Path) -> list[str]:
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise DataPrepError(f"{path}: cannot read split list ({e.strerror})") from None
  return [Path(l.strip()).stem for l in lines if l.strip()]


def splits_from_lists(scenes: Sequence[Scene], lists: Mapping[str, str | Path]) -> dict[str, str]:
  """Scene id → split, from files naming one image per line (name, stem or path).

  Scenes named in no list are left out of the dataset.
  """
  known = {s.scene_id for s in scenes}
  assignment: dict[str, str] = {}
  for split, list_path in lists.items():
    for stem in _read_list(Path(list_path)):
      if stem not in known:
        raise DataPrepError(f"{list_path}: {stem!r} is not among the input images")
      if assignment.get(stem, split) != split:
        raise DataPrepError(f"{list_path}: {stem!r} is already in split {assignment[stem]!r}")
      assignment[stem] = split
  return assignment


def subset_list_members(list_path: str | Path, assignment: Mapping[str, str]) -> set[str]:
  """Scene ids named by a subset list; each must be in one of the dataset's splits."""
  members = set()
  for stem in _read_list(Path(list_path)):
    if stem not in assignment:
      raise DataPrepError(f"{list_path}: {stem!r} is not among the images of any split")
    members.add(stem)
  return members


def group_regex(group_pattern: str | None) -> re.Pattern | None:
  """The compiled `--group-pattern` (None without one); DataPrepError if it is not a regex."""
  if not group_pattern:
    return None
  try:
    return re.compile(group_pattern)
  except re.error as e:
    raise DataPrepError(f"--group-pattern {group_pattern!r} is not a valid regular expression ({e})") from None


def splits_by_scene(scenes: Sequence[Scene], fractions: Mapping[str, float], seed: int,
                    group_pattern: str | None = None) -> dict[str, str]:
  """Scene id → split, whole scene groups at a time, shuffled by `seed`.

  Groups are scene ids, or the first capture group of `group_pattern` matched
  against the id (so tiles cut from one big scene stay together). Split i gets
  round(fraction_i * groups) groups (the last split takes the rest); every split
  with a positive fraction gets at least one group when there are enough.
  """
  if any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0):
    raise DataPrepError(f"split fractions {dict(fractions)} must be non-negative and sum to 1")
  pattern = group_regex(group_pattern)
  def group_of(scene_id: str) -> str:
    if pattern is None:
      return scene_id
    match = pattern.search(scene_id)
    if match is None:
      raise DataPrepError(f"scene {scene_id!r} does not match --group-pattern {group_pattern!r}")
    return match.group(1) if match.groups() else match.group(0)
  groups = sorted({group_of(s.scene_id) for s in scenes})
  positive = [name for name, f in fractions.items() if f > 0]
  if len(groups) < len(positive):
    raise DataPrepError(f"{len(groups)} scene groups cannot fill the {len(positive)} splits {positive}")
  order = np.random.default_rng(seed).permutation(len(groups))
  counts = [max(1, round(fractions[name] * len(groups))) for name in positive]
  while sum(counts) > len(groups):  # rounding up small splits may overshoot
    counts[int(np.argmax(counts))] -= 1
  counts[-1] = len(groups) - sum(counts[:-1])
  group_split, start = {}, 0
  for name, count in zip(positive, counts):
    for i in order[start:start + count]:
      group_split[groups[i]] = name
    start += count
  return {s.scene_id: group_split[group_of(s.scene_id)] for s in scenes}


def subset_order(num_records: int, seed: int) -> np.ndarray:
  """(N,) int64 permutation of a split's records; subset f is its first `subset_size`.

  Taking prefixes of one permutation makes subsets nested (1% ⊂ 5% ⊂ …).
  """
  return np.random.default_rng(seed).permutation(num_records).astype(np.int64)


def subset_size(num_records: int, fraction: float) -> int:
  """round(fraction · N), at least 1: 1% of Potsdam's 13,824 tiles is the paper's 138."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"subset fraction {fraction} must be in (0, 1]")
  return min(num_records, max(1, math.floor(fraction * num_records + 0.5)))
