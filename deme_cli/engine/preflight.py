"""What a command will need, checked before it starts work: the training data (path, columns, captions), the free
disk for the checkpoints and models it will write, the prompts, the eval reference and CLIP model, the weight
search's settings. `deme run` checks every stage's needs before the first one starts, so a missing eval.reference
fails in seconds instead of after hours of training. Each check raises the UsageError its stage would raise later.

The disk estimate per range, for a UNet of P parameters in fp32 (4 bytes each): a checkpoint holds the student, the
EMA and AdamW's two moments (16 P bytes); up to keep_checkpoints + 1 of them exist while a new one is written; final/
and final-raw/ hold 8 P bytes.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Optional

from .errors import UsageError

GB = 1e9


def check_data(data, text_to_image: bool) -> int:
    """The training data can be read: the folder or dataset, its image column, and for text-to-image models the
    captions of every image. Returns the number of images."""
    if text_to_image:
        from .captions import image_caption_pairs

        n, _, _ = image_caption_pairs(data)
    else:
        from .data import SOURCES

        n = len(SOURCES[data.source](data))
    return n if data.max_samples is None else min(n, data.max_samples)


def unet_parameters(base) -> Optional[int]:
    """The number of parameters of the base UNet, read from its safetensors header (no weights loaded); None when
    the weights are not one safetensors file."""
    folder = Path(base.folder) / "unet"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        for k, v in header.items():
            if k != "__metadata__":
                n = 1
                for d in v["shape"]:
                    n *= d
                total += n
    return total


def range_bytes(params: int, keep_checkpoints: int) -> int:
    """Bytes one range writes at most (see the module docstring)."""
    return 16 * params * (keep_checkpoints + 1) + 8 * params


def check_disk(run_root: Path, base, train, ranges_left: int) -> None:
    """Enough free disk under the run directory for `ranges_left` ranges' checkpoints and final models."""
    if ranges_left <= 0:
        return
    params = unet_parameters(base)
    if params is None:
        return
    need = ranges_left * range_bytes(params, train.keep_checkpoints)
    free = shutil.disk_usage(_existing(run_root)).free
    if free < need:
        raise UsageError(f"the disk of '{run_root}' has {free / GB:.1f} GB free, but training {ranges_left} range(s) "
                         f"of a {params / 1e6:.0f}M-parameter UNet writes up to {need / GB:.1f} GB of checkpoints and "
                         f"models (train.keep_checkpoints = {train.keep_checkpoints}); free some space, lower "
                         f"train.keep_checkpoints, or use another --out")


def _existing(path: Path) -> Path:
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def check_eval(e, models: list) -> None:
    """What the eval stage will need: a reference for FID/KID (and an image folder for the loss by timestep), a CLIP
    model for CLIP score."""
    from . import loss_by_t
    from .fid import reference_kind

    if not models:
        return
    if any(m in e.metrics for m in ("fid", "kid")):
        reference_kind(e.reference)
    if "loss" in e.metrics:
        loss_by_t.check_reference(e)
    if "clip" in e.metrics and not e.clip_model:
        raise UsageError("eval.metrics has \"clip\" but eval.clip_model is not set; set it to a CLIP folder or hub id")


def check_prompts(sample, text_to_image: bool) -> None:
    """A text-to-image model samples from prompts: they must load."""
    if text_to_image:
        from .prompts import load_prompts

        load_prompts(sample)
