"""The one entry point: `python train.py --config=configs/<file>.py[:variant] --workdir=DIR`.

The config's `stage` selects what runs; any config key can be overridden with
`--config.key=value`, and an unknown key is an error. Compiled steps are kept
in JAX's persistent compilation cache (`--compilation_cache`, default
`<workdir>/jax_cache`; see glc_jax/compile_cache.py), so a resumed or repeated
run does not compile again.
"""
import importlib
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from glc_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", None,
    "Directory of JAX's persistent compilation cache (default: <workdir>/jax_cache; 'none' "
    "turns it off; the JAX_COMPILATION_CACHE_DIR environment variable wins).")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = ("demo", "pretrain", "finetune", "evaluate")


def run_stage(config, workdir: str) -> None:
  """Runs the stage `config.stage` names; bad config values raise setup.ConfigError."""
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel
  if config.stage not in STAGES:
    raise setup.ConfigError(f"config key 'stage' is {config.stage!r}; expected one of "
                            f"{', '.join(STAGES)}")
  importlib.import_module(f"glc_jax.stages.{config.stage}").run(config, workdir)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain report every save and worker at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = cli.config_value(_CONFIG)
  from glc_jax import checkpoint, compile_cache  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import loop, setup  # pylint: disable=import-outside-toplevel
  compile_cache.enable(_CACHE.value or pathlib.Path(_WORKDIR.value) / "jax_cache")
  try:
    run_stage(config, _WORKDIR.value)
  except (setup.ConfigError, loop.NonFiniteLossError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
