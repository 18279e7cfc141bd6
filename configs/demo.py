"""The README's main job: the whole chain on the embedded synthetic corpus.

    python train.py --config=configs/demo.py --workdir=runs/demo
"""
import ml_collections


def get_config(arg=None):
  del arg
  config = ml_collections.ConfigDict()
  config.stage = "demo"
  config.seed = 0
  config.synthetic = ml_collections.ConfigDict(dict(
      num_scenes=6, size=1024, bands=4, dtype="uint8"))
  config.lock()
  return config
