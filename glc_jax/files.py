"""Files written whole or not at all."""
from __future__ import annotations

import os
import pathlib


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes `text` to `path` through a hidden sibling and a rename: a kill leaves the old file or the new one, whole."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
