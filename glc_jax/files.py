"""Files written whole or not at all: each output is written to a hidden sibling and renamed
over its path only when complete, so a kill leaves the old file or the new one, never a part."""
from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Iterator


def temp_beside(path: str | os.PathLike) -> pathlib.Path:
  """The hidden path in `path`'s folder (so the final rename is atomic) that `path` is
  written to first; the folder is made if missing. The file is not created here: the writer
  creates it, with the umask's permissions (a mkstemp file would be owner-only). The name is
  fixed, so a write killed midway leaves one leftover that the next write of `path` replaces;
  one writer per file at a time, which the workdir lock sees to."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return path.with_name(f".{path.name}.tmp")


def discard(temp: pathlib.Path, sidecars: tuple[str, ...] = ()) -> None:
  """Removes a temporary output and the sidecar files a writer may have left beside it
  (GDAL's '.aux.xml', say)."""
  for leftover in (temp, *(temp.with_name(temp.name + s) for s in sidecars)):
    leftover.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, sidecars: tuple[str, ...] = ()) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write; it becomes `path` if the block ends without an
  exception and is removed otherwise."""
  temp = temp_beside(path)
  try:
    yield temp
    os.replace(temp, path)
  finally:
    discard(temp, sidecars)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  with atomic_path(path) as temp:
    temp.write_text(text)
