"""Stock diffusers pipelines around a run's models (the model kinds' `pipeline`, kinds.py): what `load_pipeline`
(deme_cli/api.py) returns.

DDIMPipeline for unconditional UNets sampled with DDIM, DDPMPipeline for the other schedulers, StableDiffusionPipeline
(the base's VAE, text encoder and tokenizer) for text-to-image. The UNet is a DemeModel's UNet with the channel-wise
projections its forward hooks apply registered as its submodule `deme_projections`, so that `pipe.to(device or
dtype)` moves and casts them too; or, for the ensemble (the paper's "before merge", Eq. 7), an `EnsembleUNet` that
sends each call to the range model whose [lo, hi) holds the call's timestep.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Sequence

from .errors import UsageError

PROJECTIONS_ATTR = "deme_projections"    # the UNet submodule that holds the projections the hooks apply


def pipeline_unet(denoiser):
    """The UNet a pipeline gets for a model_specs denoiser: the DemeModel's UNet with its projections as a submodule,
    or an EnsembleUNet of the range models."""
    from .denoise import EnsembleDenoiser

    if isinstance(denoiser, EnsembleDenoiser):
        return ensemble_unet([own_projections(m) for m in denoiser.models], denoiser.ranges)
    return own_projections(denoiser.model)


def own_projections(deme_model):
    """The UNet of a DemeModel, holding the projections its hooks apply as the submodule `deme_projections` (so that
    .to() moves and casts them with the UNet). Do not use the DemeModel afterwards: its state_dict would hold the
    projections twice."""
    unet = deme_model.unet
    if deme_model.projections is not None:
        unet.add_module(PROJECTIONS_ATTR, deme_model.projections)
    return unet.eval()


@functools.lru_cache(maxsize=None)
def _ensemble_class():
    import torch
    from torch import nn

    from .ranges import range_owning

    class EnsembleUNet(nn.Module):
        """The timestep-wise ensemble (paper Eq. 7) as one UNet: a call at timestep t goes to the range model whose
        [lo, hi) holds t. `config`, `dtype` and `device` are the range models' (all share one config), so diffusers
        pipelines take it as their `unet`; `calls` counts the calls per range."""

        def __init__(self, unets: Sequence[Any], ranges: Sequence[Any]):
            super().__init__()
            if len(unets) != len(ranges):
                raise ValueError(f"{len(unets)} range models for {len(ranges)} ranges")
            self.unets = nn.ModuleList(unets)
            self.ranges = list(ranges)
            self.calls = [0] * len(unets)

        @property
        def config(self):
            return self.unets[0].config

        @property
        def dtype(self):
            return next(self.parameters()).dtype

        @property
        def device(self):
            return next(self.parameters()).device

        def route(self, timestep) -> int:
            """The position of the range model owning `timestep` (a number or a tensor whose entries are all equal)."""
            t = torch.as_tensor(timestep).flatten()
            if t.numel() == 0 or not bool((t == t[0]).all()):
                raise ValueError("the ensemble routes one timestep per call; give every row of the batch the same t")
            owner = range_owning(int(t[0]), self.ranges)
            return self.ranges.index(owner)

        def forward(self, sample, timestep, *args, **kwargs):
            i = self.route(timestep)
            self.calls[i] += 1
            return self.unets[i](sample, timestep, *args, **kwargs)

    return EnsembleUNet


def ensemble_unet(unets: Sequence[Any], ranges: Sequence[Any]):
    """An EnsembleUNet of the range models `unets` (range i's model first for ranges[i])."""
    return _ensemble_class()(unets, ranges)


# --- the model kinds' pipelines (kinds.ModelKind.pipeline) -----------------------------------------------------

def unconditional_pipeline(base, unet, scheduler, device, check_only: bool = False):
    """DDIMPipeline for DDIM (it passes eta), DDPMPipeline for the other schedulers (it passes a generator to the
    scheduler's step)."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    if isinstance(scheduler, DDIMScheduler):
        cls = DDIMPipeline
    elif "generator" in inspect.signature(scheduler.step).parameters:
        cls = DDPMPipeline
    else:
        raise UsageError(f"diffusers has no unconditional pipeline for {type(scheduler).__name__} (DDPMPipeline "
                         f"passes a generator to its step); pass scheduler='ddim' (or ddpm, dpm-solver++)")
    if check_only:
        return None
    return cls(unet=unet, scheduler=scheduler).to(device)


def text_to_image_pipeline(base, unet, scheduler, device, check_only: bool = False):
    """StableDiffusionPipeline with the base's VAE, text encoder and tokenizer (no safety checker: deme's pipelines
    are saved without one)."""
    from diffusers import StableDiffusionPipeline

    from .text2image import FrozenEncoders, check_pipeline

    check_pipeline(base.folder)
    if check_only:
        return None
    enc = FrozenEncoders(base.folder, device)
    enc.check_unet(unet.config)
    return StableDiffusionPipeline(vae=enc.vae, text_encoder=enc.text_encoder, tokenizer=enc.tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(device)
