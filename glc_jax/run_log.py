"""What a run reports: a progress bar, JSON lines and TensorBoard events in the workdir."""
from __future__ import annotations

import json
import math
import pathlib
import time

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm


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
    self._jsonl = open(work / "metrics.jsonl", "a")
    self._tb = SummaryWriter(str(work / "tb"))
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
