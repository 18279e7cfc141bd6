"""The demo chain on the synthetic corpus (the README's main job).

Every step writes under the workdir and is skipped or resumed when its output
is already there, so rerunning the command continues where it stopped. The
demo holds its workdir (run.lock) while it runs; a second demo there is refused.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections

from data_prep import convert, splits, synthetic
from glc_jax.stages import evaluate, finetune, pretrain, run_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  # Each stage below holds its own sub-workdir (other lock files), so holding
  # this one for the whole chain cannot block them.
  with run_dir.claim(workdir):
    _chain(config, pathlib.Path(workdir))


def _chain(config: ml_collections.ConfigDict, work: pathlib.Path) -> None:
  corpus, dataset = work / "synthetic", work / "dataset"
  print(f"[1/5] synthetic corpus → {corpus}")
  if not corpus.exists():
    s = config.synthetic
    synthetic.write_corpus(corpus, s.num_scenes, s.size, s.size, config.seed, s.bands, s.dtype,
                           progress=True)
  print(f"[2/5] ArrayRecord dataset → {dataset}")
  convert.convert(str(corpus / "images"), dataset, str(corpus / "labels"),
                  class_map=str(corpus / "class_dict.csv"), tile=config.prep.tile,
                  split_fractions=splits.parse_fractions(config.prep.split_fractions),
                  split_seed=config.seed)

  print("[3/5] GLCNet pretraining")
  pre = config.pretrain.copy_and_resolve_references()
  pre.data.path = str(dataset)
  pretrain.run(pre, str(work / "pretrain_glcnet"))

  results = {}
  for init in ("glcnet", "random"):
    print(f"[4/5] fine-tuning on {config.prep.label_fraction:.0%} of the labels, init: {init}")
    ft = config.finetune.copy_and_resolve_references()
    ft.data.path = str(dataset)
    ft.data.label_fraction = config.prep.label_fraction
    ft.init.kind = "checkpoint" if init == "glcnet" else "random"
    ft.init.path = str(work / "pretrain_glcnet") if init == "glcnet" else ""
    finetune.run(ft, str(work / f"finetune_{init}"))
    print(f"[5/5] evaluating ({init}) on the test scenes")
    ev = config.evaluate.copy_and_resolve_references()
    ev.data.path = str(dataset)
    ev.checkpoint = str(work / f"finetune_{init}")
    results[init] = evaluate.run(ev, str(work / f"eval_{init}"))

  rows = [f"{'init':<8} {'OA':>7} {'Kappa':>7} {'mIoU':>7}"]
  for init, r in results.items():
    rows.append(f"{init:<8} {100 * r['overall_accuracy']:7.2f} {100 * (r['kappa'] or 0):7.2f} "
                f"{100 * r['miou']:7.2f}")
  table = "\n".join(rows)
  (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
  print(f"\nTest scenes, fine-tuned on {config.prep.label_fraction:.0%} of the training labels:\n{table}")
