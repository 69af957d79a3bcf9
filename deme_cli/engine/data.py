"""Training images: local image folders and Hugging Face datasets, with the release's transforms.

`build_dataset(data, seed, channels)` returns a map-style dataset of float tensors in [-1, 1], shape (C, H, W), where
C is the model's `in_channels` (images are converted to grayscale, RGB or RGBA to match) and H = W = data.resolution.
Transform (the release's, paper-spec section 2.3): resize the shorter side to the resolution (bilinear), centre or
random crop, optional horizontal flip, scale to [-1, 1].

Resumable, reproducible order: an item is addressed by a key `(index, epoch)`; its random crop and flip come from a
generator seeded with (seed, epoch, index), so the same key always gives the same tensor, in any worker, after any
resume. `EpochBatches` yields the keys of one epoch's shuffled micro-batches (a permutation seeded with
(seed, epoch)), starting at any batch of the epoch, so a run continues exactly where its checkpoint stopped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}   # model in_channels -> PIL mode
_AUGMENT_STREAM = 0xA06   # seed-sequence tags keep the augmentation and permutation streams apart
_ORDER_STREAM = 0x0D3


# --- sources: each returns a picklable loader with len() and loader(i) -> PIL image ---------------------------------
# (picklable so DataLoader workers also work where they are spawned rather than forked)

class ImageFiles:
    """A list of image files as a loader: len() and loader(i) -> PIL image (loaded, file closed)."""

    files: list

    def __len__(self) -> int:
        return len(self.files)

    def __call__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            im.load()
            return im


class FolderImages(ImageFiles):
    """Every image file under data.path (recursive, sorted), png/jpg/jpeg/webp/bmp."""

    def __init__(self, data):
        root = Path(data.path).expanduser()
        if not root.is_dir():
            raise UsageError(f"data.path '{data.path}' is not a folder; point it at a folder of images")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not self.files:
            raise UsageError(f"data.path '{data.path}' holds no images ({', '.join(IMAGE_SUFFIXES)}); add some or "
                             f"point data.path elsewhere")


def _load_hf(name: str, split: str):
    """A hub dataset by name, a local dataset folder (load_dataset), or a folder written by save_to_disk."""
    import datasets

    local = Path(name).expanduser()
    try:
        if local.is_dir() and (local / "state.json").is_file():             # save_to_disk of one split
            return datasets.load_from_disk(str(local))
        if local.is_dir() and (local / "dataset_dict.json").is_file():      # save_to_disk of a DatasetDict
            dd = datasets.load_from_disk(str(local))
            if split not in dd:
                raise UsageError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(dd)}); set data.split")
            return dd[split]
        return datasets.load_dataset(str(local) if local.exists() else name, split=split)
    except UsageError:
        raise
    except (ValueError, KeyError) as e:
        if "split" in str(e).lower():
            raise UsageError(f"dataset '{name}' has no split '{split}'; set data.split") from None
        raise UsageError(f"could not load dataset '{name}' ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    except Exception as e:  # offline, unknown repo, missing files: the datasets library raises many kinds
        raise UsageError(f"could not load dataset '{name}' ({type(e).__name__}); check data.name, or download it "
                         f"once and point data.name at the local folder") from None


class HFImages:
    """Column data.image_column of datasets.load_dataset(data.name, split=data.split)."""

    def __init__(self, data):
        self.ds = _load_hf(data.name, data.split)
        if data.image_column not in self.ds.column_names:
            raise UsageError(f"dataset '{data.name}' has no column '{data.image_column}' (columns: "
                             f"{', '.join(self.ds.column_names)}); set data.image_column")
        if len(self.ds) == 0:
            raise UsageError(f"dataset '{data.name}' split '{data.split}' is empty; choose another data.split")
        self.column = data.image_column

    def __len__(self) -> int:
        return len(self.ds)

    def __call__(self, i: int):
        return _to_pil(self.ds[int(i)][self.column])


def _to_pil(value):
    """An HF image cell (PIL image, {'bytes','path'} dict, array or path) as a PIL image."""
    import io

    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        return Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, (str, Path)):
        return Image.open(value)
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


SOURCES: dict[str, Callable[[Any], Any]] = {
    "imagefolder": FolderImages,
    "hf": HFImages,
}


# --- transform ---------------------------------------------------------------------------------------------------

def augment_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind one item's random crop and flip: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([_AUGMENT_STREAM, seed, epoch, index])


def to_tensor(img, resolution: int, channels: int, center_crop: bool, random_flip: bool,
              rng: Optional[np.random.Generator]):
    """PIL image -> float32 tensor (channels, resolution, resolution) in [-1, 1].

    Resize the shorter side to `resolution` (bilinear), crop (centre, or random from `rng`), flip left-right with
    probability 1/2 when `random_flip`.
    """
    import torch
    from PIL import Image

    img = img.convert(PIL_MODES[channels])
    w, h = img.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BILINEAR)
    if center_crop or rng is None:
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
    else:
        left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.float32).reshape(resolution, resolution, channels)
    if random_flip and rng is not None and rng.random() < 0.5:
        arr = arr[:, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
    return x / 127.5 - 1.0


class ImageDataset:
    """Images as (C, H, W) float tensors in [-1, 1]; key = index or (index, epoch).

    Subclasses for text-to-image add captions by overriding `item(index, image)`.
    """

    def __init__(self, load: Callable[[int], Any], n: int, resolution: int, channels: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.load, self.n = load, n
        self.resolution, self.channels = resolution, channels
        self.center_crop, self.random_flip, self.seed = center_crop, random_flip, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key):
        index, epoch = (key, 0) if isinstance(key, (int, np.integer)) else key
        if not 0 <= index < self.n:
            raise IndexError(index)
        try:
            img = self.load(int(index))
        except OSError as e:
            raise UsageError(f"image {index} of the training data cannot be read ({e}); remove or fix it") from None
        rng = augment_rng(self.seed, epoch, int(index))
        return self.item(int(index), to_tensor(img, self.resolution, self.channels, self.center_crop,
                                               self.random_flip, rng))

    def item(self, index: int, image):
        return image


def build_dataset(data, seed: int, channels: int = 3):
    """The training images of `[data]` as a map-style dataset (see the module docstring); `seed` drives the
    augmentations."""
    if channels not in PIL_MODES:
        raise UsageError(f"the model takes {channels} input channels; image training supports "
                         f"{', '.join(map(str, PIL_MODES))}")
    load = SOURCES[data.source](data)
    n = len(load) if data.max_samples is None else min(len(load), data.max_samples)
    return ImageDataset(load, n, data.resolution, channels, data.center_crop, data.random_flip, seed)


# --- order -------------------------------------------------------------------------------------------------------

def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the n items in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([_ORDER_STREAM, seed, epoch]).permutation(n)


def batches_per_epoch(n: int, batch_size: int, num_processes: int = 1) -> int:
    """Micro-batches per epoch; the incomplete last global batch is dropped so every process stays in step."""
    per = n // (batch_size * num_processes)
    if per < 1:
        raise UsageError(f"the training data holds {n} images, fewer than one batch ({batch_size} x {num_processes} "
                         f"process(es)); lower train.batch_size or add images")
    return per


class EpochBatches:
    """Batch sampler: the keys [(index, epoch), ...] of one epoch's micro-batches for one process, from `start`.

    Global micro-batch b of the epoch holds permutation[b*B*P : (b+1)*B*P]; process r takes its r-th slice of B.
    """

    def __init__(self, n: int, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                 num_processes: int = 1):
        self.n, self.B, self.seed, self.epoch, self.start = n, batch_size, seed, epoch, start
        self.rank, self.P = rank, num_processes
        self.count = batches_per_epoch(n, batch_size, num_processes)

    def __len__(self) -> int:
        return max(0, self.count - self.start)

    def __iter__(self):
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for b in range(self.start, self.count):
            lo = (b * self.P + self.rank) * self.B
            yield [(int(i), self.epoch) for i in perm[lo:lo + self.B]]
