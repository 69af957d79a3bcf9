"""Stable Diffusion models: the frozen VAE and text encoder, and the text-to-image denoiser for sampling.

`FrozenEncoders` holds a pipeline's VAE, tokenizer and text encoder (frozen, fp32): latents for training
(`captions.py`), text embeddings, and the decoder for sampling.

`TextToImageDenoiser` plugs a Stable Diffusion UNet into `denoise.py`'s denoising loop: per-image prompts become text
embeddings (`condition`), classifier-free guidance combines the unconditional (negative prompt, default "") and the
conditional predictions,

    eps = eps(x_t, t, c_neg) + guidance_scale * (eps(x_t, t, c) - eps(x_t, t, c_neg))      (guidance_scale > 1)

and the VAE decodes the final latents. It wraps any UNet denoiser, so the timestep-wise ensemble routes SD steps too.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from .errors import UsageError

SD_COMPONENTS = ("vae", "text_encoder", "tokenizer")


# --- the frozen parts of a Stable Diffusion pipeline ---------------------------------------------------------------

def check_pipeline(pipeline_dir: Path) -> None:
    """A text-to-image pipeline folder must hold vae/, text_encoder/ and tokenizer/."""
    missing = [c for c in SD_COMPONENTS if not (Path(pipeline_dir) / c).is_dir()]
    if missing:
        raise UsageError(f"pipeline folder '{pipeline_dir}' has no {', '.join(m + '/' for m in missing)}; "
                         f"text-to-image needs a Stable Diffusion pipeline saved with save_pretrained "
                         f"(vae/, text_encoder/, tokenizer/, unet/, scheduler/)")


def _load(what: str, fn: Callable, folder: Path):
    try:
        return fn(folder)
    except Exception as e:  # transformers/diffusers raise OSError, ValueError, KeyError... for broken folders
        raise UsageError(f"could not load the {what} from '{folder}' ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None


class FrozenEncoders:
    """The pipeline's VAE, tokenizer and text encoder: frozen, eval mode, fp32, used without gradients."""

    def __init__(self, pipeline_dir: Path, device="cpu"):
        import torch
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel
        from transformers.utils import logging as transformers_logging

        check_pipeline(pipeline_dir)
        transformers_logging.disable_progress_bar()  # deme reports its own progress; keep stderr to one line per stage
        p = Path(pipeline_dir)
        self.tokenizer = _load("tokenizer", AutoTokenizer.from_pretrained, p / "tokenizer")
        self.text_encoder = _load("text encoder", CLIPTextModel.from_pretrained, p / "text_encoder")
        self.vae = _load("VAE", AutoencoderKL.from_pretrained, p / "vae")
        self.device = torch.device(device)
        for m in (self.text_encoder, self.vae):  # fp32 as loaded: the encoders run once per pair (or are cached)
            m.to(self.device).eval().requires_grad_(False)
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.scale = 2 ** (len(cfg.block_out_channels) - 1)   # pixels per latent pixel (8 for SD)
        self.latent_channels = int(cfg.latent_channels)
        self.text_dim = int(self.text_encoder.config.hidden_size)
        self.pixel_channels = int(cfg.in_channels)

    def check_unet(self, unet_config) -> None:
        """The UNet must take these latents and text embeddings."""
        if int(unet_config.in_channels) != self.latent_channels:
            raise UsageError(f"the UNet takes {unet_config.in_channels} input channels but the VAE makes "
                             f"{self.latent_channels}-channel latents; inpainting/depth UNets are not supported")
        if int(unet_config.cross_attention_dim) != self.text_dim:
            raise UsageError(f"the UNet's cross_attention_dim is {unet_config.cross_attention_dim} but the text "
                             f"encoder's width is {self.text_dim}; the pipeline folder mixes models")

    def encode_images(self, pixels):
        """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8): posterior mean, shifted and scaled as diffusers does."""
        import torch

        with torch.no_grad():
            mean = self.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mean
        return (mean - self.shift_factor) * self.scaling_factor

    def decode(self, latents):
        """Latents (B, 4, h, w) -> images (B, 3, 8h, 8w) in [-1, 1] (not clamped), float32."""
        import torch

        with torch.no_grad():
            return self.vae.decode(latents.to(self.device, torch.float32) / self.scaling_factor
                                   + self.shift_factor).sample.float()

    def encode_text(self, captions: list[str]):
        """Captions -> text embeddings (B, L, D): the last hidden state, as the SD pipelines condition on."""
        import torch

        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return self.text_encoder(ids.to(self.device))[0]

    def identity(self) -> str:
        """A hash of the VAE, text-encoder and tokenizer weights/files (part of the cache key)."""
        from .models import state_hash

        h = hashlib.sha256()
        h.update(state_hash(self.vae.state_dict()).encode())
        h.update(state_hash(self.text_encoder.state_dict()).encode())
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        h.update(str(self.tokenizer.model_max_length).encode())
        return h.hexdigest()[:16]


# --- sampling ------------------------------------------------------------------------------------------------------

class TextToImageDenoiser:
    """A UNet denoiser (one model or the timestep-wise ensemble) with prompts, classifier-free guidance and the VAE.

    Implements denoise.py's denoiser interface: sample_shape (latents), condition(prompts), __call__(x, t, ctx),
    decode(latents) -> images in [-1, 1]. The inner denoiser is called with ctx = UNet keyword arguments.
    """

    def __init__(self, inner, encoders: FrozenEncoders, guidance_scale: float, negative_prompt: str | None = None):
        self.inner, self.encoders = inner, encoders
        self.guidance_scale, self.negative_prompt = float(guidance_scale), negative_prompt or ""
        self.sample_shape = inner.sample_shape

    @property
    def guided(self) -> bool:
        """Guidance is on for guidance_scale > 1, as in the diffusers SD pipelines (1 is the conditional model)."""
        return self.guidance_scale > 1.0

    @property
    def modules(self) -> list:
        return self.inner.modules

    @property
    def calls(self):
        return getattr(self.inner, "calls", None)

    def condition(self, prompts):
        """Prompts -> UNet keyword arguments: text embeddings, [negative; prompts] when guided."""
        import torch

        c = self.encoders.encode_text(list(prompts))
        if self.guided:
            c = torch.cat([self.encoders.encode_text([self.negative_prompt] * len(prompts)), c])
        return {"encoder_hidden_states": c}

    def __call__(self, x, t, ctx):
        if not self.guided:
            return self.inner(x, t, ctx)
        import torch

        eps_neg, eps = self.inner(torch.cat([x, x]), t, ctx).chunk(2)
        return eps_neg + self.guidance_scale * (eps - eps_neg)

    def decode(self, x):
        return self.encoders.decode(x)

    def compile(self) -> None:
        self.inner.compile()


def prompts_digest(prompts: list[str]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(p.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def text_to_image(base, sample, resolution: int, device, load):
    """The text-to-image kind's denoiser (kinds.py): prompts, encoders, then the UNet(s) from load(), wrapped for
    sampling with `[sample]`'s prompts and guidance; `resolution` (data.resolution) sizes latents when the UNet's
    config has no sample size.

    Image k gets prompt k mod len(prompts); samples.json records the prompt of every image ("prompts") so CLIP score
    can pair them, and the resume settings include the prompts' digest and the guidance.
    """
    from .denoise import Loaded
    from .prompts import load_prompts, prompt_for

    s = sample
    prompts = load_prompts(s)                   # bad prompts and a pipeline without encoders fail before load()
    encoders = FrozenEncoders(base.folder, device)
    loaded = load()
    encoders.check_unet(loaded.denoiser.modules[0].config)
    per_image = [prompt_for(prompts, k) for k in range(s.num_images)]
    guidance = {"guidance_scale": s.guidance_scale, "negative_prompt": s.negative_prompt}
    denoiser = TextToImageDenoiser(loaded.denoiser, encoders, s.guidance_scale, s.negative_prompt)
    if not loaded.denoiser.modules[0].config.sample_size:   # no latent size in the config: data.resolution pixels
        side = resolution // encoders.scale
        denoiser.sample_shape = (encoders.latent_channels, side, side)
    return Loaded(
        denoiser,
        {**loaded.info, "encoders_hash": encoders.identity()},
        loaded.identity,
        cond=lambda k: prompt_for(prompts, k),
        settings={**loaded.settings, **guidance, "prompts_digest": prompts_digest(per_image)},
        record={**loaded.record, **guidance, "prompt_source": s.prompts, "num_prompts": len(prompts),
                "prompts": per_image},
    )
