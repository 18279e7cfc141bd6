"""The demo chain on the synthetic corpus (the README's main job).

Each step writes under the workdir and is skipped when its output is already
there, so rerunning the command continues where it stopped.
"""
import pathlib

import ml_collections

from data_prep import synthetic


def run(config: ml_collections.ConfigDict, workdir: str) -> None:
  work = pathlib.Path(workdir)
  corpus = work / "synthetic"
  if corpus.exists():
    print(f"[1/1] synthetic corpus: reusing {corpus}")
  else:
    print(f"[1/1] synthetic corpus: writing {config.synthetic.num_scenes} scenes to {corpus}")
    synthetic.write_corpus(corpus, config.synthetic.num_scenes, config.synthetic.size,
                           config.synthetic.size, config.seed, config.synthetic.bands,
                           config.synthetic.dtype, progress=True)
  print("Not yet part of the demo (landing with their issues): ArrayRecord conversion, "
        "GLCNet pretraining, 1%-label fine-tuning, evaluation table.")
