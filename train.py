"""The one entry point: `python train.py --config=configs/<file>.py[:variant] --workdir=DIR`.

The config's `stage` selects what runs; any config key can be overridden with
`--config.key=value`, and an unknown key is an error.
"""
import importlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from glc_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("demo", "pretrain", "finetune", "evaluate")


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain report every save and worker at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  stage = config.stage
  if stage not in STAGES:
    sys.exit(f"error: config key 'stage' is {stage!r}; expected one of {', '.join(STAGES)}")
  stage_module = importlib.import_module(f"glc_jax.stages.{stage}")
  from glc_jax.stages import loop, setup  # pylint: disable=import-outside-toplevel
  try:
    stage_module.run(config, _WORKDIR.value)
  except (setup.ConfigError, loop.NonFiniteLossError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
