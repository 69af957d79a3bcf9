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


def _unet_shapes(base) -> Optional[dict]:
    """{tensor name: shape} of the base UNet, read from its safetensors header(s) (no weights loaded); None when the
    weights are not safetensors files."""
    folder = Path(base.folder) / "unet"
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return None
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def unet_parameters(base) -> Optional[int]:
    """The number of parameters of the base UNet (from its safetensors header); None when unknown."""
    shapes = _unet_shapes(base)
    return None if shapes is None else sum(_numel(s) for s in shapes.values())


def trained_parameters(base, deme=None) -> Optional[int]:
    """The parameters a range trains and stores: the whole UNet, or with deme.adapter = "lora" rank * (in * k * k +
    out) per adapted weight (the projections are left out: at most a few percent of a UNet). None when unknown."""
    from .adapters import ATTENTION, DEFAULT_TARGETS, is_lora, matches

    shapes = _unet_shapes(base)
    if shapes is None or deme is None or not is_lora(deme):
        return None if shapes is None else sum(_numel(s) for s in shapes.values())
    try:
        cls = json.loads((Path(base.folder) / "unet" / "config.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError):
        cls = ""
    targets = deme.lora_targets or DEFAULT_TARGETS.get(cls, ATTENTION)
    total = 0
    for k, shape in shapes.items():
        mod = k[: -len(".weight")] if k.endswith(".weight") else None
        if mod and len(shape) in (2, 4) and any(matches(mod, t) for t in targets):
            total += deme.lora_rank * (_numel(shape[1:]) + shape[0])
    return total


def range_bytes(params: int, keep_checkpoints: int) -> int:
    """Bytes one range writes at most (see the module docstring)."""
    return 16 * params * (keep_checkpoints + 1) + 8 * params


def check_disk(run_root: Path, base, train, ranges_left: int, deme=None) -> None:
    """Enough free disk under the run directory for `ranges_left` ranges' checkpoints and final models (of the
    parameters they train: `trained_parameters`)."""
    if ranges_left <= 0:
        return
    params = trained_parameters(base, deme)
    if params is None:
        return
    need = ranges_left * range_bytes(params, train.keep_checkpoints)
    free = shutil.disk_usage(_existing(run_root)).free
    if free < need:
        what = "LoRA adapters" if deme is not None and deme.adapter == "lora" else "UNet"
        raise UsageError(f"the disk of '{run_root}' has {free / GB:.1f} GB free, but training {ranges_left} range(s) "
                         f"of {params / 1e6:.0f}M trained parameters ({what}) writes up to {need / GB:.1f} GB of "
                         f"checkpoints and "
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
