"""Command line: python -m data_prep --images DIR --out DATASET [options]; see docs/data_prep.md."""
from __future__ import annotations

import argparse
import logging
import sys

from data_prep.beam_settings import RUNNERS, BeamSettings, parse_pipeline_options
from data_prep.errors import DataPrepError
from data_prep import splits
from data_prep.splits import DEFAULT_SUBSET_FRACTIONS


def _colour(text: str) -> tuple[int, int, int]:
  try:
    rgb = tuple(int(v) for v in text.split(","))
  except ValueError:
    rgb = ()
  if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
    raise argparse.ArgumentTypeError(f"colour {text!r} must be R,G,B with values 0-255")
  return rgb


def _key_value(text: str) -> tuple[str, str]:
  key, sep, value = text.partition("=")
  if not sep or not key or not value:
    raise argparse.ArgumentTypeError(f"{text!r} must be NAME=VALUE")
  return key, value


def _one_file_each(pairs: list[tuple[str, str]], flag: str, same=str) -> dict[str, str] | None:
  """NAME=FILE pairs as a dict, refusing a name given twice (a dict would keep the last file,
  silently dropping the scenes of the first); `same` maps a name to what identifies it."""
  files: dict[str, str] = {}
  for key, value in pairs:
    for earlier, earlier_file in files.items():
      if same(earlier) == same(key):
        raise DataPrepError(f"{flag}: {key} is given twice ({earlier_file}, {value}); give one "
                            "list per name")
    files[key] = value
  return files or None


def _fraction_key(text: str) -> float | str:
  try:
    return float(text)
  except ValueError:
    return text  # convert names it in its own error


def _fractions(text: str) -> dict[str, float]:
  try:
    return splits.parse_fractions(text)
  except DataPrepError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _float_list(text: str) -> list[float]:
  try:
    return [float(v) for v in text.split(",")]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated numbers") from None


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m data_prep",
      description="Tile GeoTIFF scenes (and labels) into a TFDS ArrayRecord dataset.")
  io = p.add_argument_group("inputs and output")
  io.add_argument("--images", nargs="+", required=True, metavar="PATH",
                  help="directories, globs, .tif files or @list.txt files of image scenes")
  io.add_argument("--labels", nargs="+", metavar="PATH",
                  help="label rasters (1-band index or RGB colour), paired with images by file stem; "
                       "omit for an unlabelled corpus")
  io.add_argument("--label-stem-replace", type=_key_value, metavar="OLD=NEW",
                  help="image stem → label stem substitution, e.g. RGBIR=label")
  io.add_argument("--out", required=True, help="dataset folder to create")
  io.add_argument("--overwrite", action="store_true",
                  help="replace an existing dataset built from other inputs or settings")
  tiles = p.add_argument_group("tiling")
  tiles.add_argument("--tile", type=int, default=256, help="tile side in pixels (default 256)")
  tiles.add_argument("--stride", type=int, help="step between tiles in pixels (default: tile)")
  tiles.add_argument("--no-edge-tiles", action="store_true",
                     help="drop the remainder at the far edges instead of adding flush edge tiles")
  tiles.add_argument("--nodata", type=float,
                     help="image nodata value (overrides the files'); a value of their pixel type")
  tiles.add_argument("--max-nodata-fraction", type=float, default=0.5,
                     help="skip tiles with a larger share of nodata pixels (default 0.5)")
  cls = p.add_argument_group("classes")
  cls.add_argument("--class-map", help="potsdam, vaihingen, or a CSV (header: name,R,G,B in any order)")
  cls.add_argument("--class-map-order", choices=("RGB", "BGR"),
                   help="colour column order of the CSV, overriding its header")
  cls.add_argument("--ignore-colour", type=_colour, action="append", default=[], metavar="R,G,B",
                   help="label colour to map to the ignore index 255 (repeatable)")
  cls.add_argument("--unknown-to-ignore", action="store_true",
                   help="map label colours missing from the class map to 255 instead of failing")
  spl = p.add_argument_group("splits and subsets")
  spl.add_argument("--split-list", type=_key_value, action="append", default=[], metavar="SPLIT=FILE",
                   help="file naming the images of a split, one per line (repeatable)")
  spl.add_argument("--split-fractions", type=_fractions, metavar="SPLIT=F,...",
                   help="split whole scenes at random, e.g. train=0.8,val=0.1,test=0.1")
  spl.add_argument("--split-seed", type=int, default=0)
  spl.add_argument("--group-pattern", metavar="REGEX",
                   help="scene group for --split-fractions: first regex group of the file stem")
  spl.add_argument("--subset-fractions", type=_float_list, default=list(DEFAULT_SUBSET_FRACTIONS),
                   metavar="F,...", help="nested labelled subsets to record (default 0.01,...,1)")
  spl.add_argument("--subset-seed", type=int, default=0)
  spl.add_argument("--subset-list", type=_key_value, action="append", default=[],
                   metavar="F=FILE", help="file naming the images whose tiles are the labelled "
                   "subset of fraction F, instead of a seeded draw, e.g. "
                   "0.01=trainR1_RGBIR.txt (repeatable)")
  run = p.add_argument_group("run")
  run.add_argument("--workers", type=int, default=2, help="reader processes (default 2)")
  run.add_argument("--no-progress", action="store_true", help="no progress bar")
  beam = p.add_argument_group("Apache Beam (needs the beam extra; docs/data_prep.md, Beam)")
  beam.add_argument("--beam", action="store_true",
                    help="read and write on Beam instead of local processes (DirectRunner unless --runner)")
  beam.add_argument("--runner", choices=RUNNERS, help="Beam runner; implies --beam")
  beam.add_argument("--beam_pipeline_options", "--beam-pipeline-options", metavar="KEY=VALUE,...",
                    help="options passed to the runner, e.g. direct_num_workers=2 or "
                         "project=P,region=R,temp_location=gs://B/tmp")
  return p


def _beam_settings(args) -> BeamSettings | None:
  """The Beam runner and options the flags ask for; None for the local path."""
  if not (args.beam or args.runner):
    if args.beam_pipeline_options:
      raise DataPrepError("--beam_pipeline_options needs --beam or --runner")
    return None
  options = parse_pipeline_options(args.beam_pipeline_options) if args.beam_pipeline_options else ()
  return BeamSettings(args.runner or "DirectRunner", options)


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="data_prep: %(message)s")
  # GDAL warnings about a broken file would precede our one-line error about it.
  logging.getLogger("rasterio").setLevel(logging.ERROR)
  # Beam's INFO lines narrate its own stages; a remote runner's job link stays visible.
  logging.getLogger("apache_beam").setLevel(logging.WARNING)
  logging.getLogger("apache_beam.runners.dataflow").setLevel(logging.INFO)
  from data_prep.convert import convert  # after parsing, so --help stays fast
  try:
    beam = _beam_settings(args)
    out = convert(
        args.images, args.out, args.labels, tile=args.tile, stride=args.stride,
        keep_edge_tiles=not args.no_edge_tiles, class_map=args.class_map,
        class_map_order=args.class_map_order, ignore_colours=args.ignore_colour,
        unknown_to_ignore=args.unknown_to_ignore, nodata=args.nodata,
        max_nodata_fraction=args.max_nodata_fraction,
        split_lists=_one_file_each(args.split_list, "--split-list"), split_fractions=args.split_fractions,
        split_seed=args.split_seed, group_pattern=args.group_pattern,
        subset_fractions=args.subset_fractions, subset_seed=args.subset_seed,
        subset_lists=_one_file_each(args.subset_list, "--subset-list", _fraction_key),
        label_stem_replace=args.label_stem_replace, workers=args.workers,
        overwrite=args.overwrite, progress=not args.no_progress, beam=beam)
  except DataPrepError as e:
    print(f"data_prep: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("data_prep: interrupted; nothing was written", file=sys.stderr)
    return 130
  logging.getLogger("data_prep").info("dataset ready at %s", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
