"""The resolved base: `[model]` and the device and precision choices, worked out once per command.

`resolve_base(model, device, precision)` finds the pretrained pipeline folder (a local folder as-is, a hub id through
huggingface_hub: `models.resolve_pretrained`, called only here), reads its noise schedule (T, prediction type) and its
UNet class (the model kind of `kinds.py`: the training task and the sampling denoiser), and records the device and
precision every stage then uses. The device and precision are looked up when first used, so commands that never touch
a tensor (`deme split`) do not import torch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from .devices import pick_device, resolve_precision
from .errors import UsageError
from .loss import TARGETS

@dataclass(frozen=True)
class Base:
    """The pretrained model every stage starts from, and where and how precisely the stage computes."""

    pretrained: str                  # model.pretrained as the recipe gives it (folder or hub id)
    revision: Optional[str]          # model.revision
    folder: Path                     # the local diffusers pipeline folder
    scheduler_config: dict           # scheduler/scheduler_config.json of the pipeline
    T: int                           # training timesteps of the noise schedule
    prediction_type: str             # epsilon | v_prediction | sample: what the UNet predicts
    kind: Any                        # kinds.ModelKind: the training task and the sampling denoiser
    device_choice: str = "auto"      # train.device
    precision_choice: str = "auto"   # train.mixed_precision or sample.precision, by stage

    @functools.cached_property
    def device(self):
        """The torch device (CUDA or CPU) of this process; accelerate picks the GPU index under a launcher."""
        return pick_device(self.device_choice)

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @functools.cached_property
    def precision(self) -> str:
        """fp32 | bf16 | fp16: the choice resolved on the device."""
        return resolve_precision(self.precision_choice, self.device)

    def __getstate__(self) -> dict:
        """Pickled (to a worker process) without the device and precision looked up here: the worker looks them up
        again under its own CUDA_VISIBLE_DEVICES."""
        return {k: v for k, v in self.__dict__.items() if k not in ("device", "precision")}

    def with_precision(self, choice: str) -> "Base":
        """The same base for a stage with another precision choice (train.mixed_precision or sample.precision)."""
        return replace(self, precision_choice=choice)

    def noise_scheduler(self):
        """A fresh DDPMScheduler of the pipeline's noise schedule: the forward process of training and held-out
        losses (x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)

    def load_unet(self, dtype=None):
        """The pretrained UNet (UNet2DModel or UNet2DConditionModel)."""
        from .models import load_unet

        return load_unet(self.folder, dtype=dtype)

    def load(self, projection: bool = False, dtype=None):
        """The pretrained UNet as a DemeModel (with identity projections when asked: they compute the same
        function)."""
        from .models import load_base

        return load_base(self.folder, projection, dtype)


def resolve_base(model, device: str = "auto", precision: str = "auto") -> Base:
    """`[model]` (a recipe.ModelSection) and the device and precision choices -> the resolved Base."""
    from .kinds import kind_of
    from .models import resolve_pretrained, scheduler_config

    folder = resolve_pretrained(model.pretrained, model.revision)
    cfg = scheduler_config(folder)
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in TARGETS:
        raise UsageError(f"the scheduler's prediction_type '{prediction_type}' is not supported (known: "
                         f"{', '.join(TARGETS)})")
    return Base(model.pretrained, model.revision, folder, cfg, int(cfg.get("num_train_timesteps", 1000)),
                prediction_type, kind_of(folder), device, precision)
