"""A workdir is held by one run at a time, and a resumed run keeps the config it started with.

The lock is held by real second processes (a tiny holder that only takes it,
or train.py); the stages are stopped before any compute, so nothing compiles.
"""
import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest

from data_prep import convert, synthetic
from glc_jax.stages import demo, finetune, pretrain, run_dir

_HOLDER = """
import sys
from glc_jax.stages import run_dir
with run_dir.claim(sys.argv[1]):
  print("held", flush=True)
  sys.stdin.read()
"""


@contextlib.contextmanager
def _held(work: pathlib.Path):
  """Another process holding `work` until the block ends; yields that process."""
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(work)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline() == "held\n", proc.stderr.read()
    yield proc
  finally:
    proc.stdin.close()
    proc.wait(timeout=60)


def _load_config(name: str, variant: str):
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", f"configs/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def _pretrain_config(data):
  config = _load_config("pretrain", "glcnet,tiny")
  config.data.path = str(data)
  config.data.batch_size = 8
  config.num_steps = 4
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp("workdir")
  synthetic.write_corpus(root / "corpus", num_scenes=2, height=128, width=128, seed=1)
  return convert.convert(str(root / "corpus" / "images"), root / "ds", str(root / "corpus" / "labels"),
                         class_map=str(root / "corpus" / "class_dict.csv"), tile=64, workers=0,
                         progress=False)


@pytest.fixture
def no_compute(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the workdir must be checked before the model is initialised")

  monkeypatch.setattr(pretrain.methods, "init_train_state", refuse)
  monkeypatch.setattr(finetune.methods, "init_train_state", refuse)


# --- the lock ---------------------------------------------------------------------------------

def test_busy_workdir_is_refused_naming_the_other_run(tmp_path):
  work = tmp_path / "work"
  with _held(work) as other:
    with pytest.raises(run_dir.WorkdirBusyError) as error:
      with run_dir.claim(work):
        pass
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{work} is in use by another run (pid {other.pid} on "
                            f"{socket.gethostname()}, started ")


def test_pretrain_on_a_busy_workdir_is_refused_before_compute(dataset, tmp_path, no_compute):
  work = tmp_path / "work"
  with _held(work):
    with pytest.raises(run_dir.WorkdirBusyError, match="is in use by another run"):
      pretrain.run(_pretrain_config(dataset), str(work))
    assert [p.name for p in work.iterdir()] == [run_dir.LOCK_FILE]


def test_train_py_on_a_busy_workdir_is_one_line(dataset, tmp_path):
  """...and leaves the live run's compilation cache alone (the workdir's own, created by the
  time the refusal comes, whichever process made it)."""
  work = tmp_path / "work"
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  with _held(work) as other:
    result = subprocess.run(
        [sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny", f"--workdir={work}",
         f"--config.data.path={dataset}", "--config.data.batch_size=8", "--config.num_steps=4"],
        capture_output=True, text=True, timeout=120, env=env)
    assert (work / "jax_cache").is_dir()
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {work} is in use by another run (pid {other.pid} on "), result.stderr[-2000:]


def test_a_killed_holder_does_not_block(tmp_path):
  work = tmp_path / "work"
  proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(work)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline() == "held\n"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert json.loads((work / run_dir.LOCK_FILE).read_text())["pid"] == proc.pid  # left behind
  with run_dir.claim(work):
    assert json.loads((work / run_dir.LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_file_naming_a_live_pid_does_not_block(tmp_path):
  # A reused pid (here: a live process) must not make an unheld lock look held.
  work = tmp_path / "work"
  work.mkdir()
  (work / run_dir.LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                                    "started": "earlier"}))
  with run_dir.claim(work):
    pass


def test_a_claim_leaves_no_lock_and_no_empty_workdir(tmp_path):
  with run_dir.claim(tmp_path / "fresh"):
    assert (tmp_path / "fresh" / run_dir.LOCK_FILE).is_file()
  assert not (tmp_path / "fresh").exists()
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "keep.txt").write_text("mine")
  with run_dir.claim(tmp_path / "used"):
    pass
  assert [p.name for p in (tmp_path / "used").iterdir()] == ["keep.txt"]


def test_a_held_workdir_cannot_be_claimed_again_but_its_subfolders_can(tmp_path):
  with run_dir.claim(tmp_path / "demo"):
    with run_dir.claim(tmp_path / "demo" / "pretrain_glcnet"):
      pass
    with pytest.raises(run_dir.WorkdirBusyError, match=f"pid {os.getpid()} "):
      with run_dir.claim(tmp_path / "demo"):
        pass


def test_demo_on_a_busy_workdir_is_refused_before_writing(tmp_path, monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("the demo wrote its corpus into a busy workdir")

  monkeypatch.setattr(demo.synthetic, "write_corpus", refuse)
  work = tmp_path / "demo"
  with _held(work):
    with pytest.raises(run_dir.WorkdirBusyError):
      demo.run(_load_config("demo", None), str(work))
    assert [p.name for p in work.iterdir()] == [run_dir.LOCK_FILE]


# --- resuming with another config ---------------------------------------------------------------

def _trained_workdir(work: pathlib.Path, config) -> bytes:
  """A workdir as a run of `config` leaves it after its first checkpoint; returns config.json."""
  (work / "checkpoints" / "4").mkdir(parents=True)
  text = json.dumps(config.to_dict(), indent=2) + "\n"
  (work / "config.json").write_text(text)
  return text.encode()


def test_changed_model_and_optimizer_are_refused_before_anything_is_written(dataset, tmp_path,
                                                                            no_compute):
  work = tmp_path / "work"
  stored = _trained_workdir(work, _pretrain_config(dataset))
  config = _pretrain_config(dataset)
  config.model.width = 0.5
  config.optimizer.lr = 0.002
  config.num_steps = 6  # resumable: not named
  with pytest.raises(run_dir.ConfigChangedError) as error:
    pretrain.run(config, str(work))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{work} holds a run started with another config: "
                            "model.width 0.25 → 0.5, optimizer.lr 0.001 → 0.002; ")
  assert "num_steps" not in message.split(";")[0]
  assert (work / "config.json").read_bytes() == stored
  assert sorted(p.name for p in work.iterdir()) == ["checkpoints", "config.json"]


@pytest.mark.parametrize("key, value", [("data.num_workers", 0), ("seed", 1), ("input.patch_size", 8),
                                        ("loss.temperature", 0.2), ("method", "simclr")])
def test_keys_that_change_the_run_are_refused(dataset, tmp_path, key, value):
  work = tmp_path / "work"
  _trained_workdir(work, _pretrain_config(dataset))
  config = _pretrain_config(dataset)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(run_dir.ConfigChangedError, match=f": {key} "):
    with run_dir.claim(work, config):
      pass


def test_the_same_dataset_written_relative_or_absolute_is_no_change(dataset, tmp_path, monkeypatch):
  work = tmp_path / "work"
  stored = _pretrain_config(dataset)
  stored.data.path = dataset.name  # relative to the folder the run started in
  _trained_workdir(work, stored)
  config = _pretrain_config(dataset)
  assert config.data.path == str(dataset) and os.path.isabs(config.data.path)
  monkeypatch.chdir(dataset.parent)
  assert run_dir.config_changes(work, config) == {}
  config.data.path = str(tmp_path / "another")
  with pytest.raises(run_dir.ConfigChangedError, match=r": data.path "):
    run_dir.config_changes(work, config)


def test_config_json_keeps_the_dataset_as_an_absolute_path(dataset, tmp_path, monkeypatch):
  """Evaluation reads the training dataset from config.json, maybe from another folder."""
  config = _pretrain_config(dataset)
  monkeypatch.chdir(dataset.parent)  # getcwd() is resolved: compare resolved paths below
  config.data.path = dataset.name
  with run_dir.claim(tmp_path / "work", config) as claim:
    claim.record_config("pretrain")
  stored = json.loads((tmp_path / "work" / "config.json").read_text())
  assert pathlib.Path(stored["data"]["path"]).resolve() == dataset.resolve()
  assert os.path.isabs(stored["data"]["path"])
  assert run_dir.config_changes(tmp_path / "work", config) == {}


def test_a_resume_on_a_dataset_rebuilt_under_the_same_path_is_refused(tmp_path, monkeypatch):
  """data.path compares as a place; what the dataset holds tells a rebuilt one, not how it was
  made: an identical rebuild from touched inputs resumes."""
  synthetic.write_corpus(tmp_path / "corpus", num_scenes=2, height=128, width=128, seed=1)

  def build(tile):
    return convert.convert(str(tmp_path / "corpus" / "images"), tmp_path / "ds",
                           str(tmp_path / "corpus" / "labels"), tile=tile, workers=0,
                           progress=False, overwrite=True)

  class Checkpoints:
    def close(self):
      pass

  def fake_fit(state, train_step, iterator, rng, *, workdir, **kwargs):
    (pathlib.Path(workdir) / "checkpoints" / "4").mkdir(parents=True, exist_ok=True)
    return state, Checkpoints()

  monkeypatch.setattr(pretrain.methods, "init_train_state", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.methods, "make_train_step", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.pipelines, "make_iterator", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.loop, "fit", fake_fit)
  config = _pretrain_config(build(64))
  config.probe.enabled = False
  work = tmp_path / "work"
  pretrain.run(config, str(work))
  pretrain.run(config, str(work))  # the same dataset: resumes
  for image in (tmp_path / "corpus" / "images").iterdir():
    os.utime(image)  # touched, not changed: data_prep rebuilds, the same tiles come out
  build(64)
  pretrain.run(config, str(work))
  # A key a later data_prep adds to metadata.json is not a change of the dataset.
  metadata = json.loads((tmp_path / "ds" / "metadata.json").read_text())
  (tmp_path / "ds" / "metadata.json").write_text(json.dumps({**metadata, "added_later": 1}))
  pretrain.run(config, str(work))
  build(32)
  with pytest.raises(run_dir.ConfigChangedError, match=(
      r"^data.path: .*/ds holds another dataset than the one the run in .*/work started on "
      r"\(other tiles, scenes, statistics or subsets: rebuilt since\?\); resuming would go on "
      r"with other data: use another --workdir$")):
    pretrain.run(config, str(work))
  # dataset.json in the form an earlier version wrote (data_prep's fingerprint): not checked.
  (work / run_dir.DATASET_FILE).write_text('{"data.path": "ds", "fingerprint": "ddf7"}')
  pretrain.run(config, str(work))


def test_a_run_stored_before_a_key_was_added_resumes_at_its_old_value(dataset, tmp_path):
  work = tmp_path / "work"
  older = _pretrain_config(dataset)
  del older.model["bn_momentum"]
  _trained_workdir(work, older)
  config = _pretrain_config(dataset)
  assert run_dir.config_changes(work, config) == {}
  config.model.bn_momentum = 0.1
  with pytest.raises(run_dir.ConfigChangedError, match=r": model.bn_momentum 0.9 → 0.1; "):
    run_dir.config_changes(work, config)


def test_a_resumable_change_is_recorded_and_config_json_kept(dataset, tmp_path, monkeypatch, capsys):
  """The run goes on with the new num_steps; config.json keeps the original, the change is logged."""
  fit_lengths = []

  class Closable:
    def close(self):
      pass

  def fake_fit(state, train_step, iterator, rng, *, total_steps, **kwargs):
    fit_lengths.append(total_steps)
    return state, Closable()

  monkeypatch.setattr(pretrain.methods, "init_train_state", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.methods, "make_train_step", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.pipelines, "make_iterator", lambda *a, **k: None)
  monkeypatch.setattr(pretrain.loop, "fit", fake_fit)
  work = tmp_path / "work"
  stored = _trained_workdir(work, _pretrain_config(dataset))
  config = _pretrain_config(dataset)
  config.num_steps, config.log_every = 6, 1
  for _ in range(2):  # the second run changes nothing further
    pretrain.run(config, str(work))
  assert fit_lengths == [6, 6]
  # Pretraining's cosine is rebuilt for the new length: the lr jumps, and the resume line says so.
  assert capsys.readouterr().out.splitlines() == [
      f"pretrain glcnet: resuming {work} with log_every 10 → 1, num_steps 4 → 6 (recorded in "
      "config_changes.jsonl); the lr schedule is now the cosine of a run of the new length, so the "
      "lr may change at the resume step"]
  assert (work / "config.json").read_bytes() == stored
  lines = (work / run_dir.CHANGES_FILE).read_text().splitlines()
  assert len(lines) == 1
  assert json.loads(lines[0])["changes"] == {"log_every": {"from": 10, "to": 1},
                                             "num_steps": {"from": 4, "to": 6}}
  config.num_steps = 4  # going back is a change again
  pretrain.run(config, str(work))
  assert json.loads((work / run_dir.CHANGES_FILE).read_text().splitlines()[-1])["changes"] == {
      "num_steps": {"from": 6, "to": 4}}


@pytest.mark.parametrize("changes, total_steps, message", [
    ({"epochs": 40}, 4, r"epochs 20 → 40 changes nothing while num_steps is 4 \(it sets the length "
                        r"unless it is 0\); change num_steps"),
    ({"num_steps": 3}, 3, r"with num_steps 4 → 3 the run is 3 steps long, below step 4, which it "
                          r"has reached; use another workdir for a shorter run"),
    # The length in epochs: the stage counts the steps (here 2 steps per epoch).
    ({"num_steps": 0, "epochs": 1}, 2, r"with num_steps 4 → 0, epochs 20 → 1 the run is 2 steps "
                                       r"long, below step 4, which it has reached; use another "
                                       r"workdir for a shorter run"),
])
def test_a_length_change_that_would_not_do_what_it_says_is_refused(dataset, tmp_path, changes,
                                                                    total_steps, message):
  work = tmp_path / "work"
  _trained_workdir(work, _pretrain_config(dataset))  # reached step 4 with num_steps 4
  config = _pretrain_config(dataset)
  config.update(changes)
  with pytest.raises(run_dir.ConfigChangedError, match=f"^{work}: {message}$"):
    run_dir.config_changes(work, config, total_steps)
  config.epochs, config.num_steps = 20, 8  # lengthening by num_steps is what works
  assert run_dir.config_changes(work, config) == {"num_steps": (4, 8)}


def test_a_workdir_without_a_checkpoint_starts_afresh(dataset, tmp_path):
  # A run that stopped before its first checkpoint bound nothing: its config.json is replaced.
  work = tmp_path / "work"
  work.mkdir()
  (work / "config.json").write_text(json.dumps(_pretrain_config(dataset).to_dict()))
  config = _pretrain_config(dataset)
  config.model.width = 0.5
  with run_dir.claim(work, config) as claim:
    claim.record_config("pretrain")
  assert json.loads((work / "config.json").read_text())["model"]["width"] == 0.5


def test_a_dataset_folder_is_refused_as_workdir(dataset, tmp_path):
  """Typing the dataset's path for --workdir would write a run (and a compile cache) into it."""
  before = sorted(p.name for p in dataset.iterdir())
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the workdir's
  result = subprocess.run(
      [sys.executable, "train.py", "--config=configs/pretrain.py:glcnet,tiny", f"--workdir={dataset}",
       f"--config.data.path={dataset}", "--config.data.batch_size=8", "--config.num_steps=4"],
      capture_output=True, text=True, timeout=120, env=env)
  assert (result.returncode, result.stderr.strip().splitlines()) == (
      1, [f"error: workdir {dataset} holds a data_prep dataset; use another --workdir"])
  assert sorted(p.name for p in dataset.iterdir()) == before


def test_a_workdir_inside_a_dataset_is_refused_for_the_stages_and_the_benchmark(dataset, tmp_path):
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  from glc_jax.stages import setup  # pylint: disable=import-outside-toplevel
  before = sorted(p.name for p in dataset.iterdir())
  message = (f"^workdir {dataset / 'run1'} is inside {dataset}, which holds a data_prep dataset; "
             "use another --workdir$")
  with pytest.raises(setup.ConfigError, match=message):
    with run_dir.claim(dataset / "run1", _pretrain_config(dataset)):
      pass
  config = _load_config("benchmark", "smoke")
  config.data.path = str(dataset)
  with pytest.raises(setup.ConfigError, match=message):
    runner.run(config, str(dataset / "run1"))
  assert sorted(p.name for p in dataset.iterdir()) == before


def test_another_stages_workdir_is_refused_by_its_stage_alone(dataset, tmp_path):
  """Fine-tuning in a pretraining workdir: one short line, not a diff of every key the configs differ in."""
  work = tmp_path / "work"
  stored = _trained_workdir(work, _pretrain_config(dataset))
  config = _load_config("finetune", "random,tiny")
  config.data.path = str(dataset)
  with pytest.raises(run_dir.ConfigChangedError) as error:
    with run_dir.claim(work, config):
      pass
  assert str(error.value) == f"workdir {work} holds a pretrain run; use another --workdir"
  assert (work / "config.json").read_bytes() == stored
