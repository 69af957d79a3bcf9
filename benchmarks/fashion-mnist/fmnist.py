"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (Expat licence), read straight from its IDX files.

`apt-get install dataset-fashion-mnist` puts the four IDX files (gzip) under /usr/share/datasets/fashion-mnist:
60,000 training and 10,000 test images, 28 x 28 grayscale uint8, 10 balanced classes.
"""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def load(split: str, data_dir: Path = DEFAULT_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of split 'train' or 'test'."""
    data_dir = Path(data_dir)
    img_file, lbl_file = FILES[split]
    if not (data_dir / img_file).is_file():
        raise SystemExit(f"{data_dir / img_file} not found: install the Debian package dataset-fashion-mnist "
                         f"(apt-get install -y dataset-fashion-mnist) or pass --data-dir")
    with gzip.open(data_dir / img_file) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(data_dir / lbl_file) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    assert len(x) == len(y), (len(x), len(y))
    return x, y


def resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 (N, 28, 28) -> uint8 (N, resolution, resolution) with deme's own training transform (PIL bilinear),
    so pretraining, the shipped PNGs and `deme train` on 28 px PNGs all see the same pixels."""
    from PIL import Image

    from deme_cli.engine.data import to_tensor

    if resolution == images.shape[-1]:
        return images.copy()
    out = np.empty((len(images), resolution, resolution), np.uint8)
    for i, a in enumerate(images):
        x = to_tensor(Image.fromarray(a), resolution, 1, center_crop=True, random_flip=False, rng=None)
        out[i] = np.clip(np.rint((x[0].numpy() + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return out
