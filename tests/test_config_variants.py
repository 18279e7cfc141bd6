"""Every shipped config variant runs on a small data_prep dataset and takes a step.

Each variant is loaded from its file, shrunk by overriding size keys only
(the same keys a user would set on the command line; a key the config lacks
fails the test), and run by `train.run_stage`, which is what train.py calls;
the two baselines that once failed only through train.py run through it as a
subprocess too. Shrunk, the variants of one method are the same program, so
they share one compile through the session's persistent compilation cache
(tests/conftest.py).
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
            "input.crop_size": 32, "epochs": 1, "optimizer.reference_batch": 8}
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
  return {**MODEL, **VIEWS[family], "data.batch_size": 8, "data.num_workers": 0, "num_steps": 1,
          "optimizer.reference_batch": 8}


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


def _pretrain_variants():
  module, _ = _config("pretrain")
  # ',reference' changes the step's program only for the methods listed (the ablations
  # change it as glcnet does); ',tiny,reference' is ',reference' once shrunk.
  return ([m + size for m in module.METHODS for size in ("", ",tiny")] +
          [f"{m},reference" for m in ("glcnet", "simclr", "mocov2", "inpainting", "jigsaw")] +
          ["glcnet,tiny,reference"])


def _run_dir(env, stage: str, variant: str) -> pathlib.Path:
  return env["root"] / f"{stage}_{variant.replace(',', '_')}"


@pytest.mark.slow
@pytest.mark.parametrize("variant", _pretrain_variants())
def test_pretrain_variant_takes_a_step(env, variant):
  _, config = _config("pretrain", variant)
  overrides = {**_pretrain_overrides(config.method), "data.path": env["data"]}
  if variant == "glcnet,reference":
    overrides["num_steps"] = 4  # an epoch, so that its best_loss/ checkpoint exists
  if variant == "jigsaw,reference":  # the reference's file, here a stand-in of its shape
    rng = np.random.default_rng(0)
    path = env["root"] / "permutations_1000.npy"
    np.save(path, np.stack([rng.permutation(9) for _ in range(1000)]))
    overrides["input.permutations"] = str(path)
  _override(config, overrides)
  work = _run_dir(env, "pretrain", variant)
  train.run_stage(config, str(work))
  assert _steps(work)[-1] == overrides["num_steps"]


@pytest.fixture(scope="module")
def pretrained(env):
  """A glcnet run in the finetune and evaluate variants' model size."""
  work = env["root"] / "pretrain_glcnet"
  if not (work / "metrics.jsonl").exists():
    _, config = _config("pretrain", "glcnet,tiny")
    train.run_stage(_override(config, {**_pretrain_overrides("glcnet"), "data.path": env["data"]}),
                    str(work))
  return work


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["checkpoint", "checkpoint,tiny", "random", "random,tiny",
                                     "checkpoint,reference", "random,tiny,reference"])
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


@pytest.mark.slow
def test_demo_variant_runs_the_chain(env):
  _, config = _config("demo")
  stage = {**MODEL, "data.batch_size": 8, "data.num_workers": 0}
  _override(config, {"synthetic.num_scenes": 5, "synthetic.size": 2 * TILE, "prep.tile": TILE,
                     "prep.split_fractions": "train=0.6,val=0.2,test=0.2",
                     "prep.label_fraction": 1.0,
                     **{f"pretrain.{k}": v for k, v in _pretrain_overrides("glcnet").items()},
                     **{f"finetune.{k}": v for k, v in {**stage, **FINETUNE}.items()
                        if k != "data.label_fraction"},
                     **{f"evaluate.{k}": v for k, v in EVALUATE.items()}})
  work = env["root"] / "demo"
  train.run_stage(config, str(work))
  results = json.loads((work / "results.json").read_text())
  assert sorted(results) == ["glcnet", "random"]


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


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["full", "small"])
def test_benchmark_variant_runs_a_cell(env, variant):
  from glc_jax.benchmark import runner  # pylint: disable=import-outside-toplevel
  _, config = _config("benchmark", variant)
  _override(config, {"methods": ("glcnet",), "random_init": False, "fractions": (1.0,),
                     "seeds": (0,), "finetune_steps": 0, "data.path": env["data"],
                     "compilation_cache": False})
  config.pretrain = _nested(config.pretrain, _pretrain_overrides("glcnet"))
  config.finetune = _nested(config.finetune, {k: v for k, v in FINETUNE.items()
                                              if k != "data.label_fraction"})
  config.evaluate = _nested(config.evaluate, EVALUATE)
  work = env["root"] / f"benchmark_{variant}"
  assert runner.run(config, str(work)) == []
  assert (work / "results.csv").exists()


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
