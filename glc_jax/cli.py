"""What train.py and `python -m glc_jax.benchmark` share: config-flag errors in one line."""
import sys

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
    bad = str(e).strip("\"'")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and a.split("=")[0].endswith("." + bad)), f"--config.{bad}")
    sys.exit(f"error: unknown config key {flag[len('--config.'):]!r} (from {flag}); "
             "see the config file for valid keys")
  except (ValueError, TypeError) as e:
    sys.exit(f"error: bad config override: {e}")


def config_value(holder: flags.FlagHolder) -> ml_collections.ConfigDict:
  """The --config flag's value; a missing or broken config file exits in one line."""
  try:
    config = holder.value
    config.keys()  # a file that failed to load is a proxy that raises on first use
  except OSError as e:
    sys.exit(f"error: --config: {str(e).strip().splitlines()[-1].strip()}")
  return config
