"""Which Beam runner converts a corpus, and with which pipeline options (no Beam import).

Options are written as TFDS's own `--beam_pipeline_options`: comma-separated
`key=value` items (a bare `key` is a boolean flag), each passed to Beam as
`--key=value`.
"""
from __future__ import annotations

import dataclasses

from data_prep.errors import DataPrepError

RUNNERS = ("DirectRunner", "DataflowRunner", "SparkRunner", "FlinkRunner")
INSTALL_HINT = "pip install -e '.[beam]' (or pip install 'glc-jax[beam]')"


@dataclasses.dataclass(frozen=True)
class BeamSettings:
  runner: str = "DirectRunner"
  options: tuple[str, ...] = ()  # "key=value" or "key", as parse_pipeline_options gives them

  def pipeline_flags(self) -> list[str]:
    """Command-line flags for `apache_beam.options.pipeline_options.PipelineOptions`."""
    flags = [f"--runner={self.runner}"]
    if self.runner == "DirectRunner":
      # Local worker processes would print every INFO line of their harness to
      # the terminal; the user's own options come later and win.
      flags.append("--default_sdk_harness_log_level=WARNING")
    return flags + [f"--{item}" for item in self.options]


def parse_pipeline_options(text: str) -> tuple[str, ...]:
  """'direct_num_workers=2,direct_running_mode=multi_threading' → its items.

  Raises:
    DataPrepError: an empty item, or a runner given here (it has its own flag).
  """
  items = tuple(item.strip().removeprefix("--") for item in text.split(","))
  for item in items:
    key = item.partition("=")[0]
    if not key:
      raise DataPrepError(f"--beam_pipeline_options {text!r}: items must be key=value, "
                          "separated by commas")
    if key == "runner":
      raise DataPrepError(f"--beam_pipeline_options {text!r}: choose the runner with --runner, "
                          "not in the pipeline options")
  return items
