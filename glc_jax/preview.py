"""A picture of one evaluated scene: the image, its true labels and the prediction.

The three panels sit side by side, the label maps in the dataset's class colours
(the ISPRS colours for the synthetic corpus and Potsdam/Vaihingen), pixels
without a label or a prediction black, with a legend of the classes. The PNG is
written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import rasterio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from glc_jax import files, predictions
from glc_jax.data.source import TileSource

NODATA = 255  # the label value of unlabelled pixels and the predictions' nodata


def assemble_scene(source: TileSource, scene_id: str, bands: int) -> tuple[np.ndarray, np.ndarray]:
  """The tiles of `scene_id` put back together: ((H, W, bands) image in the
  stored dtype, (H, W) uint8 labels, NODATA where no tile or no label is)."""
  records = [r for r in (source[i] for i in range(len(source))) if r["scene_id"] == scene_id]
  if not records:
    raise ValueError(f"preview: scene {scene_id!r} has no tiles in this split")
  windows = np.array([r["window"] for r in records], np.int64)
  height = int((windows[:, 0] + windows[:, 2]).max())
  width = int((windows[:, 1] + windows[:, 3]).max())
  image = np.zeros((height, width, bands), records[0]["image"].dtype)
  label = np.full((height, width), NODATA, np.uint8)
  for record, (row, col, h, w) in zip(records, windows):
    image[row:row + h, col:col + w] = record["image"]
    if "label" in record:
      label[row:row + h, col:col + w] = record["label"]
  return image, label


def display_rgb(image: np.ndarray) -> np.ndarray:
  """(H, W, B) image -> (H, W, 3) float in [0, 1]: the first three bands (R, G, B
  in the corpora we know; one band is shown grey), each stretched from its 1st
  to its 99th percentile so that 12- or 16-bit data is visible too."""
  rgb = np.asarray(image, np.float64)[..., :3]
  if rgb.shape[-1] < 3:
    rgb = np.repeat(rgb[..., :1], 3, axis=-1)
  low, high = np.percentile(rgb, [1, 99], axis=(0, 1))
  return np.clip((rgb - low) / np.maximum(high - low, 1e-12), 0.0, 1.0)


def read_prediction(path: str | os.PathLike) -> np.ndarray:
  """(H, W) uint8 class indices of a prediction GeoTIFF written by evaluation."""
  with rasterio.open(path) as raster:
    return raster.read(1)


def write_scene_preview(path: str | os.PathLike, image: np.ndarray, label: np.ndarray,
                        predicted: np.ndarray, colours: Sequence[Sequence[int]],
                        class_names: Sequence[str], title: str) -> None:
  """PNG of image | true labels | predicted labels (all (H, W) in the same grid)."""
  if not image.shape[:2] == label.shape == predicted.shape:
    raise ValueError(f"preview: image {image.shape[:2]}, labels {label.shape} and prediction "
                     f"{predicted.shape} must cover the same pixels")
  panels = (("image (R, G, B)", display_rgb(image)),
            ("true labels", predictions.colourise(label, colours, NODATA)),
            ("predicted labels", predictions.colourise(predicted, colours, NODATA)))
  fig = Figure(figsize=(12, 4.6))
  FigureCanvasAgg(fig)  # pyplot-free, so no global backend state is touched
  for k, (name, pixels) in enumerate(panels):
    ax = fig.add_subplot(1, 3, k + 1)
    ax.imshow(pixels, interpolation="nearest")
    ax.set_title(name)
    ax.set_axis_off()
  fig.suptitle(title)
  fig.legend(handles=[Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=n)
                      for n, c in zip(class_names, colours)],
             loc="lower center", ncol=len(class_names), frameon=False)
  fig.tight_layout(rect=(0, 0.07, 1, 0.95))
  with files.atomic_path(path) as temp:
    fig.savefig(temp, format="png", dpi=100)
