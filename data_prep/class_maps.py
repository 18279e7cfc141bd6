"""Class maps: class names, display colours, and colour-label → index conversion."""
from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import numpy as np

from data_prep.errors import DataPrepError

IGNORE_INDEX = 255

# ISPRS 2D semantic labelling colours (RGB), shared by Potsdam and Vaihingen.
# Black marks the eroded boundaries in the "no boundary" ground truth, which the
# benchmark excludes from scoring, hence ignore.
_ISPRS_CLASSES = (
    ("impervious_surfaces", (255, 255, 255)),
    ("building", (0, 0, 255)),
    ("low_vegetation", (0, 255, 255)),
    ("tree", (0, 255, 0)),
    ("car", (255, 255, 0)),
    ("clutter", (255, 0, 0)),
)
_ISPRS_IGNORE = ((0, 0, 0),)

_COLOUR_COLUMNS = {"r": 0, "red": 0, "g": 1, "green": 1, "b": 2, "blue": 2}


@dataclasses.dataclass(frozen=True)
class ClassMap:
  """Class names with their RGB colours; `ignore_colours` map to IGNORE_INDEX."""
  names: tuple[str, ...]
  colours: tuple[tuple[int, int, int], ...]
  ignore_colours: tuple[tuple[int, int, int], ...] = ()

  def __post_init__(self):
    if len(self.names) != len(self.colours):
      raise ValueError("one colour per class name is needed")
    if len(self.names) >= IGNORE_INDEX:
      raise DataPrepError(f"{len(self.names)} classes; at most {IGNORE_INDEX} fit in uint8 labels")
    seen = {}
    for name, colour in zip(self.names + ("<ignore>",) * len(self.ignore_colours),
                            self.colours + self.ignore_colours):
      if colour in seen:
        raise DataPrepError(f"class map: colour {colour} is given to both {seen[colour]!r} and {name!r}")
      seen[colour] = name

  def with_ignore_colours(self, colours) -> ClassMap:
    extra = tuple(tuple(c) for c in colours if tuple(c) not in self.ignore_colours)
    return dataclasses.replace(self, ignore_colours=self.ignore_colours + extra)

  def colours_to_indices(self, rgb: np.ndarray, *, unknown_to_ignore: bool,
                         source: str, origin: tuple[int, int]) -> np.ndarray:
    """Converts an RGB label tile to class indices.

    Args:
      rgb: (3, H, W) uint8 colour label (band order R, G, B).
      unknown_to_ignore: map colours not in the map to IGNORE_INDEX instead of failing.
      source: file name used in the error message.
      origin: (row, col) of the tile in the scene, so errors give scene pixels.
    Returns:
      (H, W) uint8 class indices, IGNORE_INDEX for ignore colours.
    """
    keys = (rgb[0].astype(np.uint32) << 16) | (rgb[1].astype(np.uint32) << 8) | rgb[2]
    table_colours = self.colours + self.ignore_colours
    table_keys = np.array([(r << 16) | (g << 8) | b for r, g, b in table_colours], np.uint32)
    table_values = np.array([*range(len(self.colours))] + [IGNORE_INDEX] * len(self.ignore_colours),
                            np.uint8)
    order = np.argsort(table_keys)
    table_keys, table_values = table_keys[order], table_values[order]
    pos = np.minimum(np.searchsorted(table_keys, keys), len(table_keys) - 1)
    known = table_keys[pos] == keys
    out = table_values[pos]
    if not known.all():
      if not unknown_to_ignore:
        row, col = (int(v) for v in np.argwhere(~known)[0])
        colour = tuple(int(c) for c in rgb[:, row, col])
        raise DataPrepError(
            f"{source}: label colour {colour} at pixel (row {row + origin[0]}, col {col + origin[1]}) "
            "is not in the class map (map it with --ignore-colour or --unknown-to-ignore)")
      out = np.where(known, out, np.uint8(IGNORE_INDEX))
    return out


PRESETS = {
    "potsdam": ClassMap(tuple(n for n, _ in _ISPRS_CLASSES), tuple(c for _, c in _ISPRS_CLASSES),
                        _ISPRS_IGNORE),
    "vaihingen": ClassMap(tuple(n for n, _ in _ISPRS_CLASSES), tuple(c for _, c in _ISPRS_CLASSES),
                          _ISPRS_IGNORE),
}


def read_class_csv(path: str | Path, colour_order: str | None = None) -> ClassMap:
  """Reads a class map CSV: a header, then one `name,c1,c2,c3` row per class.

  The header names the colour columns (e.g. `Class Name,B,G,R`), so their order is
  taken from it; `colour_order` ("RGB" or "BGR") overrides the header.
  """
  path = Path(path)
  try:
    with open(path, newline="", encoding="utf-8-sig") as f:
      reader = csv.reader(f)
      # (file line, row) of the rows that are not blank: messages name the line in the file.
      numbered = [(reader.line_num, r) for r in reader if any(cell.strip() for cell in r)]
  except (OSError, UnicodeDecodeError) as e:
    raise DataPrepError(f"{path}: cannot read class map ({e})") from None
  rows = [r for _, r in numbered]
  if len(rows) < 2:
    raise DataPrepError(f"{path}: class map needs a header and at least one class row")
  header = [h.strip().lower() for h in rows[0]]
  order_names = list(colour_order.lower()) if colour_order else header[1:4]
  if (len(header) < 4 or sorted(_COLOUR_COLUMNS.get(h, -1) for h in order_names) != [0, 1, 2]):
    raise DataPrepError(
        f"{path}: header {rows[0]} must be a name column followed by R, G and B columns in any order")
  channel = [_COLOUR_COLUMNS[h] for h in order_names]
  names, colours, seen, named = [], [], {}, {}
  for line, row in numbered[1:]:
    try:
      values = [int(v) for v in row[1:4]]
      if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError
    except ValueError:
      raise DataPrepError(f"{path}: line {line}: expected name and three colour values 0-255, got {row}") from None
    rgb = [0, 0, 0]
    for c, v in zip(channel, values):
      rgb[c] = v
    name, rgb = row[0].strip(), tuple(rgb)
    if rgb in seen:
      raise DataPrepError(f"{path}: line {line}: colour {rgb} of {name!r} is already given to "
                          f"{seen[rgb][0]!r} on line {seen[rgb][1]}")
    # Scores are reported per class name (metrics.json): a second class of the same name
    # would overwrite the first one's.
    if name in named:
      raise DataPrepError(f"{path}: line {line}: class name {name!r} is already given to colour "
                          f"{named[name][0]} on line {named[name][1]}")
    named[name] = (rgb, line)
    seen[rgb] = (name, line)
    names.append(name)
    colours.append(rgb)
  try:
    return ClassMap(tuple(names), tuple(colours))
  except DataPrepError as e:
    raise DataPrepError(f"{path}: {e}") from None


def load_class_map(spec: str, colour_order: str | None = None) -> ClassMap:
  """A preset name ("potsdam", "vaihingen") or the path of a class map CSV."""
  if spec.lower() in PRESETS:
    return PRESETS[spec.lower()]
  if not Path(spec).is_file():
    raise DataPrepError(f"{spec}: class map is neither a preset ({', '.join(PRESETS)}) nor a file")
  return read_class_csv(spec, colour_order)

