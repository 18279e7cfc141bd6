"""The one entry point: `python train.py --config=configs/<file>.py[:variant] --workdir=DIR`.

The config's `stage` selects what runs; any config key can be overridden with
`--config.key=value`, and an unknown key is an error. Compiled steps are kept
in JAX's persistent compilation cache (`--compilation_cache`, default
`<workdir>/jax_cache`; see glc_jax/compile_cache.py), so a resumed or repeated
run does not compile again.

A bad config value, a non-finite loss, an unreadable checkpoint or a Ctrl-C
ends the run with one line on stderr (exit status 1, or 130 for Ctrl-C) that
says what is wrong or what the stopped run keeps.
"""
import contextlib
import importlib
import os
import pathlib
import shutil

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
  setup.check_choices(config)
  importlib.import_module(f"glc_jax.stages.{config.stage}").run(config, workdir)


def interrupted_message(stage: str, workdir: str | os.PathLike) -> str:
  """The one line a Ctrl-C prints: what the stopped run keeps and how to go on."""
  work = pathlib.Path(workdir)
  if stage in ("pretrain", "finetune"):
    from glc_jax import checkpoint  # pylint: disable=import-outside-toplevel
    steps = checkpoint.saved_steps(work / "checkpoints")
    if steps:
      return (f"{stage}: interrupted; {work} keeps its newest checkpoint, step {max(steps)}; run the "
              "same command again to resume from it")
    return f"{stage}: interrupted before its first checkpoint; run the same command again to start afresh"
  if stage == "demo":
    return (f"demo: interrupted; the steps it finished are kept in {work}; run the same command "
            "again to go on from them")
  return f"{stage}: interrupted; run the same command again to {stage} again"


def _remove_if_only_cache(work: pathlib.Path, cache: str | None) -> None:
  """Removes the workdir a failed run made when all it holds is the compilation cache.

  JAX creates the cache directory at its first compilation, which may come
  before the stage's config checks have all passed; the stage itself removes a
  workdir it made and left empty (glc_jax/stages/run_dir.py).
  """
  if cache and work.is_dir() and [p.resolve() for p in work.iterdir()] == [pathlib.Path(cache).resolve()]:
    shutil.rmtree(cache, ignore_errors=True)
    with contextlib.suppress(OSError):
      work.rmdir()


def run_command(config, workdir: str, compilation_cache: str | None = None) -> None:
  """run_stage as the command runs it: with the compilation cache (the --compilation_cache flag),
  and one line on stderr and a non-zero exit, not a traceback, for a bad config or a Ctrl-C."""
  import jax  # pylint: disable=import-outside-toplevel
  from glc_jax import checkpoint, compile_cache  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import loop, run_dir, setup  # pylint: disable=import-outside-toplevel
  work = pathlib.Path(workdir)
  made = not work.exists()
  cache = compile_cache.enable(compilation_cache or work / "jax_cache")
  new_cache = cache is not None and not os.path.exists(cache)
  cli.catch_interrupts()
  try:
    run_stage(config, workdir)
    return
  except setup.ConfigError as e:
    line, status = f"error: {e}", 1
    # Process 0 alone: only it knows a busy workdir as such (the others get its message), and
    # a busy workdir's cache is the live run's by now.
    if (new_cache and not made and pathlib.Path(cache).is_relative_to(work.absolute())
        and jax.process_index() == 0 and not isinstance(e, run_dir.WorkdirBusyError)):
      # A refused run leaves a folder it did not make as it found it (a dataset, another run's).
      shutil.rmtree(cache, ignore_errors=True)
  except (loop.NonFiniteLossError, checkpoint.CheckpointError) as e:
    line, status = f"error: {e}", 1
  except KeyboardInterrupt:
    line, status = interrupted_message(config.stage, work), cli.INTERRUPTED
  if made:
    _remove_if_only_cache(work, cache)
  cli.exit_with(line, status)


def main(argv):
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain report every save and worker at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  run_command(cli.config_value(_CONFIG), _WORKDIR.value, _CACHE.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
