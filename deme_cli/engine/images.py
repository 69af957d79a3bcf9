"""Sample folders: numbered PNGs (000000.png is image 0, made with seed + 0), grid.png and samples.json."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UsageError

SAMPLES_JSON = "samples.json"


GRID_FILE = "grid.png"


GRID_MAX = 64                                   # images in grid.png


_PNG = re.compile(r"^(\d{6})\.png$")


def existing_images(folder: Path) -> dict[int, Path]:
    """Numbered PNGs (000000.png ...) in a sample folder, by index."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        m = _PNG.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def check_readable(files) -> None:
    """Every image file can be read to its end (PIL's verify: chunks and checksums, no decoding); a damaged one is a
    UsageError naming it."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception as e:
            raise UsageError(f"sample image '{f}' cannot be read ({type(e).__name__}: {e}); delete it and run "
                             f"'deme sample' again to make it") from None


def save_png(path: Path, img: np.ndarray, size: Optional[int]) -> None:
    from PIL import Image

    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_grid(folder: Path, n: int, out: Path) -> Optional[Path]:
    """grid.png of the first up to 64 numbered images in `folder`."""
    from PIL import Image

    files = existing_images(folder)
    idx = sorted(k for k in files if k < n)[:GRID_MAX]
    if not idx:
        return None
    return _save(tile([Image.open(files[k]).convert("RGB") for k in idx]), out)


def tile(ims: list):
    """PIL images of one size, row by row in a near-square RGB grid."""
    from PIL import Image

    w, h = ims[0].size
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for j, im in enumerate(ims):
        grid.paste(im.convert("RGB"), ((j % cols) * w, (j // cols) * h))
    return grid


def save_grid(images: np.ndarray, out: Path) -> np.ndarray:
    """A grid PNG of uint8 images (N, H, W, C), written atomically; returns the grid (H', W', 3) as uint8."""
    from PIL import Image

    grid = tile([Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im) for im in images])
    _save(grid, out)
    return np.asarray(grid)


def _save(im, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out
