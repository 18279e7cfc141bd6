"""What train.py and `python -m glc_jax.benchmark` share: config-flag errors and a Ctrl-C in one line."""
import logging as python_logging
import os
import re
import signal
import sys
import threading

import ml_collections
from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser (app.run's flags_parser), with a bad flag or config override reported in one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A config file that raises comes back with its traceback: keep the head and the cause.
    lines = [line.strip() for line in str(e).strip().splitlines()]
    sys.exit(f"error: {lines[0]}" + (f" {lines[-1]}" if len(lines) > 1 else ""))
  except (AttributeError, KeyError) as e:
    sys.exit(f"error: {_unknown_key(e, argv)}")
  except (ValueError, TypeError) as e:
    sys.exit(f"error: bad config override: {e}")


def _unknown_key(error: Exception, argv: list[str]) -> str:
  """'unknown config key data.batchsize (did you mean data.batch_size?)' from ml_collections' error.

  ml_collections names only the unknown part of the path (or, for a path
  through a plain value, the whole path), nested in a KeyError inside an
  AttributeError, with its own suggestion on a second line; the full key is
  the --config override in `argv` that holds that part.
  """
  cause = error
  while isinstance(cause, BaseException) and cause.args:
    cause = cause.args[0]
  text = str(cause)
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"\?', text)
  whole = re.search(r"(?:Attempting to lookup: |\(in: )([^\s)]+)", text)
  name = suggestion.group(2) if suggestion else text.partition("\n")[0].strip("\"'")
  keys = [a.split("=")[0][len("--config."):] for a in argv if a.startswith("--config.")]
  key = whole.group(1) if whole else next((k for k in keys if name in k.split(".")), name)
  parts = key.split(".")
  if suggestion and name in parts:
    at = parts.index(name)
    meant = ".".join(parts[:at] + [suggestion.group(1)] + parts[at + 1:])
    return f"unknown config key {key} (did you mean {meant}?)"
  return f"unknown config key {key}; see the config file for valid keys"


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The --config flag's value; a missing or broken config file exits in one line."""
  try:
    config = holder.value
    config.keys()  # a file that failed to load is a proxy that raises on first use
  except OSError as e:
    sys.exit(f"error: --config: {str(e).strip().splitlines()[-1].strip()}")
  return config


INTERRUPTED = 128 + signal.SIGINT  # the exit status a shell gives a command Ctrl-C stopped


def interrupt(signum, frame) -> None:
  """SIGINT handler: KeyboardInterrupt, as Python's own, with the libraries' logging off.

  Libraries log the interrupt that cuts them short (Orbax: "Save Finalize
  thread failed" and a traceback) before it reaches the command, whose one line
  says what the stopped run keeps.
  """
  del signum, frame
  python_logging.disable(python_logging.CRITICAL)
  raise KeyboardInterrupt


def catch_interrupts() -> None:
  """Installs `interrupt` for SIGINT, unless SIGINT is ignored (a background job's)."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, interrupt)
    sys.unraisablehook = _interrupt_again(sys.unraisablehook)


def _interrupt_again(hook):
  """An unraisable-exception hook that sends a swallowed KeyboardInterrupt again.

  Python ignores an exception raised in a __del__ method or a garbage-collection
  callback (JAX installs one), so a Ctrl-C landing there would be lost. It is
  sent again a moment later from a timer thread (sent at once, the handler would
  run inside this hook and be ignored too), and again if that one lands in such
  code as well, until it reaches the command.
  """

  def unraisable(info) -> None:
    if issubclass(info.exc_type, KeyboardInterrupt):
      resend = threading.Timer(0.05, os.kill, args=(os.getpid(), signal.SIGINT))
      resend.daemon = True
      resend.start()
    else:
      hook(info)

  return unraisable


def exit_with(line: str, status: int) -> None:
  """Ends the command with `line` on stderr and exit status `status`.

  After a Ctrl-C the exit skips the interpreter's teardown: an interrupted
  compile leaves XLA's threads running, and tearing down around them can
  segfault. The run's own clean-up (locks, partial files) has run by then; the
  data workers' shared memory is released here.
  """
  print(line, file=sys.stderr)
  if status == INTERRUPTED:
    # The line is out: another Ctrl-C now would only cut the clean-up short with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if "glc_jax.data.pipelines" in sys.modules:  # else no batch was ever made
      sys.modules["glc_jax.data.pipelines"].release_batches()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  sys.exit(status)
