"""A two-process job (jax.distributed over localhost) holds its workdir once, through process 0,
and when process 0 refuses a workdir every process refuses it with the same message.

The file is also the worker: `python test_workdir_multihost.py worker PORT ID ROOT OUT`.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

_HOLDER = """
import sys
from glc_jax.stages import run_dir
with run_dir.claim(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


def _config(width: float):
  import ml_collections
  return ml_collections.ConfigDict({"model": {"width": width}, "num_steps": 4})


def _attempt(claim) -> str:
  """'' if the claim succeeded, else its error's message."""
  from glc_jax.stages import setup
  try:
    with claim:
      return ""
  except setup.ConfigError as e:
    return str(e)


def _worker(port: int, process_id: int, root: pathlib.Path, out: pathlib.Path) -> None:
  from glc_jax import parallel
  parallel.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
  from glc_jax.stages import run_dir
  result = {"busy": _attempt(run_dir.claim(root / "busy")),
            "changed": _attempt(run_dir.claim(root / "trained", _config(0.5)))}
  with run_dir.claim(root / "free"):
    result["lock_pid"] = json.loads((root / "free" / run_dir.LOCK_FILE).read_text())["pid"]
    # Both processes are inside the claim here: no second lock file, and process 1 took none.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("both inside")
    result["files"] = sorted(p.name for p in (root / "free").iterdir())
    multihost_utils.sync_global_devices("both read")
  result["pid"] = os.getpid()
  out.write_text(json.dumps(result))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_process_0_locks_and_every_process_refuses_together(tmp_path):
  from conftest import child_xla_flags  # not at the top: the worker must not import conftest
  (tmp_path / "trained" / "checkpoints" / "4").mkdir(parents=True)
  (tmp_path / "trained" / "config.json").write_text(json.dumps(_config(0.25).to_dict()))
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path / "busy")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline() == "held\n"
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=child_xla_flags(1))
  procs = [subprocess.Popen([sys.executable, __file__, "worker", str(port), str(i), str(tmp_path),
                             str(tmp_path / f"out{i}.json")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
    holder.stdin.close()
    holder.wait(timeout=60)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  first, second = (json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2))
  assert first["busy"].startswith(f"{tmp_path / 'busy'} is in use by another run (pid {holder.pid} ")
  assert second["busy"] == first["busy"]
  assert first["changed"].startswith(f"{tmp_path / 'trained'} holds a run started with another "
                                     "config: model.width 0.25 → 0.5; ")
  assert second["changed"] == first["changed"]
  assert first["lock_pid"] == second["lock_pid"] == first["pid"] != second["pid"]
  assert first["files"] == second["files"] == ["run.lock"]
  assert not (tmp_path / "free").exists()


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  _worker(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]), pathlib.Path(sys.argv[5]))
