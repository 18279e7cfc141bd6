"""Input data: the dataset reader, augmentation, patch matching and Grain pipelines.

Modules (imported explicitly; this package imports nothing heavy itself):
  source     open_dataset(path, split) -> (TileSource, DatasetInfo)
  augment    numpy image ops (resize, orient, colour, blur, normalise)
  patches    ViewGeometry, sample_matched_patches
  recipes    per-method config dataclasses and record -> example functions
  pipelines  recipe_for, train_dataset, eval_dataset, make_iterator
See docs/pipelines.md.
"""
