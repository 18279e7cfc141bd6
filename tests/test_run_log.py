"""The run log holds each step once, also after a resume that replays logged steps."""
import json
import struct

from tensorboardX.proto import event_pb2

from glc_jax.run_log import RunLog


def _tensorboard_scalars(tb_dir) -> dict[str, list[tuple[int, float]]]:
  """(step, value) per tag, as TensorBoard shows them.

  Event files are TFRecords (u64 length, u32 crc, payload, u32 crc), read in
  file-name order; a SessionLog START event at step s hides the events already
  read whose step is >= s (TensorBoard's rule for a restarted run).
  """
  scalars: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(tb_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      if event.session_log.status == event_pb2.SessionLog.START:
        scalars = {tag: [(s, v) for s, v in points if s < event.step]
                   for tag, points in scalars.items()}
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def _metrics(step: int, run: int) -> dict[str, float]:
  return {"loss": run * 100.0 + step, "lr": 0.5}


def test_resumed_log_keeps_each_step_once(tmp_path):
  first = RunLog(tmp_path, total_steps=8, desc="test")
  for step in range(1, 7):
    first.step(step, _metrics(step, run=1))
  first.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 7, "lo')  # the kill cut the last write short

  resumed = RunLog(tmp_path, total_steps=8, start_step=4, desc="test")
  for step in range(5, 9):
    resumed.step(step, _metrics(step, run=2))
  resumed.close()

  # Steps up to the checkpoint come from the first run, the rest from the resumed one.
  expected = {step: _metrics(step, run=1 if step <= 4 else 2)["loss"] for step in range(1, 9)}
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  assert [r["step"] for r in records] == list(range(1, 9))
  assert {r["step"]: r["loss"] for r in records} == expected

  scalars = _tensorboard_scalars(tmp_path / "tb")
  assert sorted(scalars["loss"]) == sorted(expected.items())
  assert [s for s, _ in sorted(scalars["lr"])] == list(range(1, 9))


def test_restart_from_scratch_drops_the_old_log(tmp_path):
  # A run killed before its first checkpoint starts again from step 0.
  first = RunLog(tmp_path, total_steps=4, desc="test")
  for step in range(1, 4):
    first.step(step, _metrics(step, run=1))
  first.close()
  again = RunLog(tmp_path, total_steps=4, desc="test")
  again.step(1, _metrics(1, run=2))
  again.close()
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in records] == [(1, 201.0)]
  assert _tensorboard_scalars(tmp_path / "tb")["loss"] == [(1, 201.0)]
