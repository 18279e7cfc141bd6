"""What a run reports: a progress bar, JSON lines and TensorBoard events in the workdir.

Each step appears once in the log, also across a kill and resume: a resumed
run starts again after its checkpoint's step, and the interrupted run may have
logged steps beyond it. On opening, metrics.jsonl loses its records after the
step the run resumes from (a line the kill cut short goes too), and TensorBoard
gets a fresh event file that begins with a purge from the next step on (tensorboardX's
`purge_step`): TensorBoard then hides the older files' events from that step on,
which stay on disk. A run that starts from step 0 over an old log (killed before
its first checkpoint) drops all of it the same way.
"""
from __future__ import annotations

import json
import math
import pathlib
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from glc_jax import files


class RunLog:
  """Writes per-step metrics to `workdir/metrics.jsonl` and `workdir/tb/`, and shows progress.

  Only process 0 writes, so a multi-host run produces one log. Args:
    workdir: the run's directory.
    total_steps: steps in the whole run (for the ETA).
    start_step: the step a resumed run starts from.
    items_per_step: examples (pairs, images) per step across all hosts, for throughput.
    desc: the progress bar's label.
  """

  def __init__(self, workdir, total_steps: int, start_step: int = 0, items_per_step: int = 1,
               desc: str = "train"):
    self._enabled = jax.process_index() == 0
    self._items = items_per_step
    self._last = (start_step, time.perf_counter())
    if not self._enabled:
      return
    work = pathlib.Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    # A fresh run drops everything, also the step-0 record of a probe before the first update.
    first_dropped = start_step + 1 if start_step else 0
    _drop_records_after(work / "metrics.jsonl", first_dropped - 1)
    self._jsonl = open(work / "metrics.jsonl", "a")
    earlier = any((work / "tb").glob("events.out.tfevents.*"))
    # The suffix keeps a resume within the same second from reusing (and
    # truncating) the previous writer's file name, which has a 1 s timestamp.
    self._tb = SummaryWriter(str(work / "tb"), purge_step=first_dropped if earlier else None,
                             filename_suffix=f".from_step_{start_step}")
    self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                     dynamic_ncols=True)

  def step(self, step: int, metrics: dict[str, float]) -> None:
    """Records `metrics` (host scalars) for `step` and advances the bar to it."""
    now = time.perf_counter()
    done, then = self._last
    rate = (step - done) * self._items / max(now - then, 1e-9)
    self._last = (step, now)
    if not self._enabled:
      return
    record = {"step": step, **{k: float(v) for k, v in metrics.items()}, "items_per_s": rate}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}, refresh=False)
    self._bar.update(step - self._bar.n)

  def message(self, text: str) -> None:
    if self._enabled:
      self._bar.write(text)

  def close(self) -> None:
    if self._enabled:
      self._bar.close()
      self._tb.close()
      self._jsonl.close()


def _drop_records_after(path: pathlib.Path, last_step: int) -> None:
  """Rewrites the JSON-lines log at `path` without its records of steps after `last_step`.

  A last line without its newline is a write the kill cut short: it goes too.
  """
  if not path.exists():
    return
  lines = path.read_text().splitlines(keepends=True)
  kept = [line for line in lines
          if line.endswith("\n") and json.loads(line).get("step", 0) <= last_step]
  if len(kept) < len(lines):
    files.write_text_atomic(path, "".join(kept))
