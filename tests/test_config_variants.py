"""Every shipped config variant runs on a small data_prep dataset, or is shown to be one that does.

Each variant is loaded from its file and shrunk by overriding size keys only
(the keys a user would set on the command line; a key the config lacks fails
the test). The variants whose shrunk configs are distinct programs of the
stage run a step through `train.run_stage`, which is what train.py calls;
inpainting and jigsaw, which once failed only through train.py, run through
it as a child process. Compiling a step costs tens of seconds here, so a
variant that shrinks to the very config of one that ran (every ',tiny' twin,
',tiny,reference') is checked to be that config, and one that differs from a
run variant only in its method (the GLCNet ablations, SimCLR beside MoCo v2's
two-view input) or in keys that act inside the step is checked to differ in
exactly those keys; their steps run in tests/test_steps.py (every method, 1 vs
8 devices) and tests/test_reference_options.py (the per-device MoCo queues).
The demo variant runs, shrunk the same way, in tests/test_demo.py.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from data_prep import convert, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402  pylint: disable=wrong-import-position

TILE = 64
MODEL = {"model.depth": 18, "model.width": 0.125}
VIEWS = {"glcnet": {"input.view_size": 32, "input.patch_size": 8},
         "simclr": {"input.view_size": 32},
         "mocov2": {"input.view_size": 32, "loss.queue_size": 16},
         "inpainting": {"input.view_size": 32, "input.blocks": 4, "input.block_size": 8},
         "jigsaw": {"input.tile_size": 16, "input.tile_crop": 14, "input.augment.crop_size": 48}}
FINETUNE = {**MODEL, "data.batch_size": 8, "data.num_workers": 0, "data.label_fraction": None,
            "input.crop_size": 32, "epochs": 1, "optimizer.reference_batch": 8, "log_every": 1,
            "checkpoint_every": 4}
EVALUATE = {"eval.crop": 32, "eval.stride": 16, "eval.batch_size": 8}


def _config(name: str, variant: str | None = None):
  spec = importlib.util.spec_from_file_location(f"{name}_cfg", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(variant)


def _override(config, values: dict):
  """Sets dotted keys as --config.KEY=VALUE would; a key the config lacks raises."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = getattr(node, part)
    getattr(node, leaf)
    setattr(node, leaf, value)
  return config


def _pretrain_overrides(method: str) -> dict:
  family = "glcnet" if method.startswith("glcnet") else method
  # The online probe runs in tests/test_probe.py; here it is off and its sizes shrunk alike.
  return {**MODEL, **VIEWS[family], "data.batch_size": 8, "data.num_workers": 0, "num_steps": 1,
          "epochs": 1, "log_every": 1, "checkpoint_every": 1, "optimizer.reference_batch": 8,
          "probe.enabled": False, "probe.every_steps": 1, "probe.steps": 1, "probe.batch_size": 8}


def _shrunk(stage: str, variant: str | None, overrides: dict | None = None) -> dict:
  _, config = _config(stage, variant)
  if overrides is None:
    overrides = _pretrain_overrides(config.method) if stage == "pretrain" else FINETUNE
  return _flat(_override(config, overrides).to_dict())


def _flat(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _differing(a: dict, b: dict) -> set[str]:
  return {k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>")}


def _steps(work: pathlib.Path) -> list[int]:
  lines = (work / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line)["step"] for line in lines if '"step"' in line]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("variants")
  corpus = root / "corpus"
  synthetic.write_corpus(corpus, num_scenes=4, height=4 * TILE, width=4 * TILE, seed=3, bands=4)
  data = convert.convert(str(corpus / "images"), root / "dataset", str(corpus / "labels"),
                         class_map=str(corpus / "class_dict.csv"), tile=TILE,
                         split_fractions={"train": 0.5, "val": 0.25, "test": 0.25},
                         workers=0, progress=False)
  return {"root": root, "data": str(data)}


def _run_dir(env, stage: str, variant: str) -> pathlib.Path:
  return env["root"] / f"{stage}_{variant.replace(',', '_')}"


# Distinct programs of the pretraining stage, each run for one step (inpainting and
# jigsaw through train.py below). glcnet,reference runs a whole epoch (4 steps), so that
# its best_loss/ checkpoint exists for finetune's reference variant.
RUN_PRETRAIN = ("glcnet", "mocov2", "glcnet,reference")


@pytest.mark.slow
@pytest.mark.parametrize("variant", RUN_PRETRAIN)
def test_pretrain_variant_takes_a_step(env, variant):
  _, config = _config("pretrain", variant)
  overrides = {**_pretrain_overrides(config.method), "data.path": env["data"]}
  if variant == "glcnet,reference":
    overrides["num_steps"] = 4
  _override(config, overrides)
  work = _run_dir(env, "pretrain", variant)
  train.run_stage(config, str(work))
  assert _steps(work)[-1] == overrides["num_steps"]


def _pretrain_variants():
  module, _ = _config("pretrain")
  return ([m + size for m in module.METHODS for size in ("", ",tiny")] +
          [m + size + ",reference" for m in module.METHODS for size in ("", ",tiny")])


def _ran_pretrain_twin(variant: str) -> str:
  """The variant that ran (or runs through train.py) whose shrunk config this one must be
  equal to, or differ from only in `_ALLOWED_DIFFERENCES`."""
  method, *rest = variant.split(",")
  reference = "reference" in rest
  if method in ("inpainting", "jigsaw"):
    return method
  if method == "simclr":
    return "mocov2" + (",reference" if reference else "")
  if method == "mocov2":
    return "mocov2"
  return "glcnet" + (",reference" if reference else "")


# Keys by which a variant may differ from the one that ran, and where their effect is tested.
_ALLOWED_DIFFERENCES = {
    "method",                                     # every method's step: tests/test_steps.py
    "loss.temperature", "loss.momentum", "loss.queue_size", "loss.queue_per_device",
    "loss.gather_negatives", "loss.weight",       # loss settings: tests/test_losses.py,
                                                  # tests/test_reference_options.py
    "model.num_permutations",                     # jigsaw (the same for both sides)
    "input.patch_size", "input.patch_num", "input.patch_overlap",  # SimCLR has no patches
    "input.masks", "input.permutations", "keep_best_loss", "model.stem_init",
}


@pytest.mark.parametrize("variant", _pretrain_variants())
def test_pretrain_variant_is_a_run_config(variant):
  twin = _ran_pretrain_twin(variant)
  mine, ran = _shrunk("pretrain", variant), _shrunk("pretrain", twin)
  if variant.replace(",tiny", "") == twin:
    assert mine == ran, f"{variant} shrinks to another config than {twin}"
  extra = _differing(mine, ran) - _ALLOWED_DIFFERENCES
  assert not extra, f"{variant} differs from {twin}, which ran, in {sorted(extra)}"


@pytest.fixture(scope="module")
def pretrained(env):
  """A glcnet run in the finetune and evaluate variants' model size."""
  work = env["root"] / "pretrain_glcnet"
  if not (work / "metrics.jsonl").exists():
    _, config = _config("pretrain", "glcnet,tiny")
    train.run_stage(_override(config, {**_pretrain_overrides("glcnet"), "data.path": env["data"]}),
                    str(work))
  return work


RUN_FINETUNE = ("checkpoint", "random,tiny", "checkpoint,reference")


@pytest.mark.slow
@pytest.mark.parametrize("variant", RUN_FINETUNE)
def test_finetune_variant_takes_a_step(env, pretrained, variant):
  _, config = _config("finetune", variant)
  init = {}
  if variant == "checkpoint,reference":  # starts from the lowest-loss epoch (best_loss/)
    init = {"init.path": str(_run_dir(env, "pretrain", "glcnet,reference"))}
    if not (pathlib.Path(init["init.path"]) / "best_loss").exists():
      pytest.skip("needs test_pretrain_variant_takes_a_step[glcnet,reference]")
  elif variant.startswith("checkpoint"):
    init = {"init.path": str(pretrained)}
  _override(config, {**FINETUNE, **init, "data.path": env["data"]})
  work = _run_dir(env, "finetune", variant)
  train.run_stage(config, str(work))
  assert _steps(work)[-1] == 4  # one epoch of 32 training tiles at batch 8


@pytest.mark.parametrize("variant", ["checkpoint,tiny", "random", "random,reference",
                                     "checkpoint,tiny,reference", "random,tiny,reference"])
def test_finetune_variant_is_a_run_config(variant):
  kind, *rest = variant.split(",")
  twin = ("checkpoint,reference" if "reference" in rest else
          "checkpoint" if kind == "checkpoint" else "random,tiny")
  extra = _differing(_shrunk("finetune", variant), _shrunk("finetune", twin))
  assert extra <= {"init.kind", "init.checkpoint", "model.stem_init"}, (variant, twin, extra)


@pytest.mark.slow
@pytest.mark.parametrize("variant", [None, "reference"])
def test_evaluate_variant_writes_metrics(env, variant):
  finetuned = _run_dir(env, "finetune", "random,tiny")
  if not finetuned.exists():
    pytest.skip("needs test_finetune_variant_takes_a_step[random,tiny]")
  _, config = _config("evaluate", variant)
  _override(config, {**EVALUATE, "data.path": env["data"], "checkpoint": str(finetuned)})
  work = _run_dir(env, "evaluate", str(variant))
  train.run_stage(config, str(work))
  assert 0.0 <= json.loads((work / "metrics.json").read_text())["overall_accuracy"] <= 1.0


def _nested(base, flat: dict) -> ml_collections.ConfigDict:
  """`base` (a benchmark's stage overrides) with dotted `flat` keys merged in."""
  out = base.to_dict()
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return ml_collections.ConfigDict(out)


def _benchmark_config(env, variant: str, cells: dict | None = None):
  """The variant with its stage configs shrunk to those that ran above, on the test dataset;
  `cells` overrides its matrix keys (methods, fractions, seeds, ...)."""
  _, config = _config("benchmark", variant)
  _override(config, {**(cells or {}), "finetune_steps": 0, "finetune_validate_steps": 0,
                     "data.path": env["data"], "compilation_cache": False})
  config.pretrain = _nested(config.pretrain, _pretrain_overrides("glcnet"))
  config.finetune = _nested(config.finetune, {k: v for k, v in FINETUNE.items()
                                              if k != "data.label_fraction"})
  config.evaluate = _nested(config.evaluate, EVALUATE)
  return config


@pytest.mark.slow
def test_benchmark_smoke_runs_its_matrix(env):
  """The smoke variant's matrix (glcnet and random init; one of its two seeds, as a second
  runs the same programs) and its report."""
  from glc_jax.benchmark import report, runner  # pylint: disable=import-outside-toplevel
  work = env["root"] / "benchmark_smoke"
  config = _benchmark_config(env, "smoke", {"seeds": (0,)})
  assert runner.run(config, str(work)) == []
  rows = report.read_csv(work / "results.csv")
  assert sorted((r["init"], r["fraction"], r["seed"]) for r in rows) == [
      ("glcnet", 0.25, 0), ("random", 0.25, 0)]
  assert (work / "results.md").read_text().startswith(
      "# Benchmark (smoke, with overrides): glcnet, random")
  assert all((work / f"{k}.png").stat().st_size > 0 for k in ("overall_accuracy", "kappa", "miou"))


def test_benchmark_full_cells_are_run_configs(env):
  """The full variant's stage configs, shrunk, are configs that ran above."""
  from glc_jax.benchmark import matrix  # pylint: disable=import-outside-toplevel
  config = _benchmark_config(env, "full", {"methods": ("glcnet",), "random_init": False,
                                           "fractions": (1.0,), "seeds": (0,)})
  cell = matrix.Cell("glcnet", 1.0, 0)
  pre = _flat(matrix.pretrain_config(config, "glcnet", 0, env["data"]).to_dict())
  ran = _shrunk("pretrain", "glcnet")
  assert _differing(pre, ran) <= {"data.path"}
  fine = _flat(matrix.finetune_config(config, cell, env["root"], env["data"], 32).to_dict())
  assert _differing(fine, _shrunk("finetune", "checkpoint")) <= {
      "data.path", "data.label_fraction", "init.path"}
  matrix.evaluate_config(config, cell, env["root"], env["data"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["inpainting", "jigsaw"])
def test_baselines_run_through_train_py(env, method):
  """The command of issue 13, in a child process (compiling the step as this process did,
so it comes from the cache)."""
  work = env["root"] / f"cli_{method}"
  args = [f"--config.{k}={v}" for k, v in _pretrain_overrides(method).items()]
  child_env = dict(os.environ, JAX_DEFAULT_MATMUL_PRECISION="highest")
  proc = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), f"--config={ROOT}/configs/pretrain.py:{method},tiny",
       f"--workdir={work}", f"--config.data.path={env['data']}", *args],
      capture_output=True, text=True, env=child_env, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _steps(work) == [1]
