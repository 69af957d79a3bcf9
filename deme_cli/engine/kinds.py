"""The model kinds: what a pretrained pipeline's UNet class means for training and for sampling.

One registry holds, per kind, the training task (what a batch is, what x0 is, what the UNet takes besides (x_t, t))
and the sampling denoiser wrapper (conditions, guidance, decoding) of `denoise.py`'s loop. `kind_of(folder)` picks the
kind from the UNet's class in the pipeline folder; `base.resolve_base` records it in the resolved base.

A task is built as `kind.task(base, unet, data, seed=..., device=..., cache_dir=..., batch_size=...)` and offers
`dataset()` and `prepare(batch) -> (x0 on the device, extra UNet keyword arguments)`. A denoiser wrapper is called as
`kind.denoiser(base, sample, resolution, device, load)`, where `load()` gives the UNet(s) as a `denoise.Loaded`; it
checks its own inputs (prompts, encoders) before calling load(), so bad input fails before big models are read. A
kind's `pipeline(base, unet, scheduler, device)` is the stock diffusers pipeline of `load_pipeline` (pipelines.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .errors import UsageError


class UnconditionalTask:
    """Pixel-space unconditional DDPM: a batch is images; x0 = the images, no extra UNet inputs."""

    name = "unconditional"

    def __init__(self, base, unet, data, *, seed: int, device, cache_dir: Optional[Path] = None, batch_size: int = 16):
        self.data, self.seed, self.device, self.channels = data, seed, device, int(unet.config.in_channels)

    def dataset(self):
        from .data import build_dataset

        return build_dataset(self.data, self.seed, channels=self.channels)

    def prepare(self, batch) -> tuple[Any, dict]:
        """batch -> (x0 on the device, extra keyword arguments of the UNet call)."""
        return batch.to(self.device, non_blocking=True), {}


def _text_to_image_task(*args, **kwargs):
    from .captions import TextToImageTask

    return TextToImageTask(*args, **kwargs)


def _unconditional_denoiser(base, sample, resolution: int, device, load: Callable):
    return load()


def _text_to_image_denoiser(*args):
    from .text2image import text_to_image

    return text_to_image(*args)


def _unconditional_pipeline(*args, **kwargs):
    from .pipelines import unconditional_pipeline

    return unconditional_pipeline(*args, **kwargs)


def _text_to_image_pipeline(*args, **kwargs):
    from .pipelines import text_to_image_pipeline

    return text_to_image_pipeline(*args, **kwargs)


@dataclass(frozen=True)
class ModelKind:
    name: str                 # how errors and samples.json name it
    unet_class: str           # the diffusers UNet class of the pipeline's unet/config.json
    task: Callable            # training task factory (see the module docstring)
    denoiser: Callable        # sampling wrapper (see the module docstring)
    conditional: bool         # the UNet takes a condition (text embeddings) besides (x_t, t)
    pipeline: Callable        # the diffusers pipeline of `load_pipeline` (pipelines.py)


KINDS: dict[str, ModelKind] = {k.name: k for k in (
    ModelKind("unconditional", "UNet2DModel", UnconditionalTask, _unconditional_denoiser, False,
              _unconditional_pipeline),
    ModelKind("text-to-image", "UNet2DConditionModel", _text_to_image_task, _text_to_image_denoiser, True,
              _text_to_image_pipeline),
)}


def kind_of(folder: Path) -> ModelKind:
    """The kind of the pipeline (or UNet) folder, from its UNet's class."""
    from .models import unet_folder

    cls = json.loads((unet_folder(Path(folder)) / "config.json").read_text()).get("_class_name")
    for kind in KINDS.values():
        if kind.unet_class == cls:
            return kind
    raise UsageError(f"'{folder}' holds a {cls}, which deme cannot train yet (known: "
                     f"{', '.join(k.unet_class for k in KINDS.values())})")
