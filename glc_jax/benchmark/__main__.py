"""`python -m glc_jax.benchmark --config=configs/benchmark.py[:small] --workdir=DIR`.

Runs the comparison matrix (see configs/benchmark.py) and writes DIR/results.csv,
DIR/results.md and DIR/{overall_accuracy,kappa,miou}.png. Rerunning the same
command continues a killed run; finished cells are reused. A Ctrl-C ends it with
one line saying what is kept (exit status 130).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from glc_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/benchmark.py[:variant]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the whole benchmark.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain report every save and worker at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  from glc_jax.benchmark import matrix, runner  # pylint: disable=import-outside-toplevel
  from data_prep.errors import DataPrepError  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel
  cli.catch_interrupts()
  try:
    failed = runner.run(config, _WORKDIR.value)
  except (matrix.BenchmarkConfigError, setup.ConfigError, DataPrepError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    cli.exit_with(runner.interrupted_message(config, _WORKDIR.value), cli.INTERRUPTED)
  if failed:
    sys.exit(f"error: {len(failed)} cell(s) stopped on a non-finite loss: {', '.join(failed)}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
