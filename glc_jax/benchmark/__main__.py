"""`python -m glc_jax.benchmark --config=configs/benchmark.py[:small] --workdir=DIR`.

Runs the comparison matrix (see configs/benchmark.py) and writes DIR/results.csv,
DIR/results.md and DIR/{overall_accuracy,kappa,miou}.png. Rerunning the same
command continues a killed run; finished cells are reused.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/benchmark.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the whole benchmark.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain report every save and worker at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _CONFIG.value
  except OSError as e:  # ml_collections defers config-file errors to first access
    sys.exit(f"error: --config: {str(e).strip().splitlines()[-1].strip()}")
  from glc_jax.benchmark import matrix, runner  # pylint: disable=import-outside-toplevel
  from data_prep.errors import DataPrepError  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel
  try:
    failed = runner.run(config, _WORKDIR.value)
  except (matrix.BenchmarkConfigError, setup.ConfigError, DataPrepError) as e:
    sys.exit(f"error: {e}")
  if failed:
    sys.exit(f"error: {len(failed)} cell(s) stopped on a non-finite loss: {', '.join(failed)}")


def _parse_flags(argv):
  """absl's parser, with a bad flag or config override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}")
  except (AttributeError, KeyError) as e:
    bad = str(e).strip("\"'")
    sys.exit(f"error: unknown config key {bad!r} (in --config.{bad}=...); see configs/benchmark.py")
  except (ValueError, TypeError) as e:
    sys.exit(f"error: bad config override: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
