"""Stock diffusers pipelines around a run's models (the model kinds' `pipeline`, kinds.py): what `load_pipeline`
(deme_cli/api.py) returns.

DDIMPipeline for unconditional UNets sampled with DDIM, DDPMPipeline for the other schedulers, StableDiffusionPipeline
(the base's VAE, text encoder and tokenizer) for text-to-image. The UNet is the one diffusers loads from the model's
folder: a stock UNet, or a DemeUNet (deme_unet.py) holding the channel-wise projections (so `pipe.to(device or dtype)`
moves and casts them too) or, for the ensemble (the paper's "before merge", Eq. 7), the range models, each call sent
to the one whose [lo, hi) holds its timestep.
"""
from __future__ import annotations

import inspect

from .errors import UsageError


def pipeline_unet(denoiser):
    """The UNet a pipeline gets for a model_specs denoiser: the stock UNet of a model without projections, else a
    DemeUNet (deme_unet.py: the class model folders ship; the ensemble already is one). A DemeModel's UNet is used,
    not copied: do not use the DemeModel afterwards."""
    from .deme_unet import DemeUNet

    model = denoiser.model
    if isinstance(model, DemeUNet):
        return model.eval()
    if model.projections is None:
        return model.unet.eval()
    return DemeUNet.from_models([model.unet], [model.projections])


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
