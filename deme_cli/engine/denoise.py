"""The denoising loop of `deme sample` and the weight search: schedulers, denoisers, per-image seeds.

Image k uses seed + k: its initial noise and any per-step noise (DDPM, DDIM with eta > 0) come from its own
`torch.Generator(seed + k)` on the CPU, so the noise of an image does not depend on the batch size, the device or
the other images. The denoising loop is our own (not a diffusers pipeline) and talks to a *denoiser*: an object with

    sample_shape            (C, H, W) of the space the scheduler works in (pixels here; latents for Stable Diffusion)
    condition(conds)        per-batch context from per-image conditions (None for unconditional models)
    __call__(x, t, ctx)     the model output (epsilon) at integer timestep t; every row of x shares t
    decode(x)               images in [-1, 1]

so a text-to-image denoiser (prompts, guidance, VAE decode) plugs into the same loop (the model kinds of kinds.py).

The "ensemble" (the paper's "before merge", Eq. 7) is a routed model (routed.py, deme_unet.DemeUNet) that sends each
denoising call to the range model whose [lo, hi) holds t; all samples of a batch share t and one scheduler, so
multistep solvers see one history.

Batch invariance on the CPU: the noise is per image by construction; the arithmetic is made batch-size independent
by (1) padding every model call to the full batch size (the last, partial batch is filled with copies of its last
image, whose results are dropped), because some CPU kernels take another path for a batch of 1, and (2) computing
linear layers whose input rows are all equal (the timestep embedding: every row shares t) on one row. With these,
images are bit-identical across batch sizes 2-32 on our CPUs (tested: 8 vs 3); very large batches may switch
convolution algorithms and differ in the last float bit. GPUs choose kernels by batch size, so there images agree
up to floating-point rounding.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .devices import resolve_precision
from .errors import UsageError
from .speed import compile_backend


@dataclass
class Loaded:
    """A model loaded for sampling: its denoiser and what the records say about it (model_specs.py)."""

    denoiser: Any
    info: dict                                   # what samples.json records about the model
    identity: dict = field(default_factory=dict)  # what must match for a resume (hashes)
    cond: Optional[Callable[[int], Any]] = None  # the condition of image k (its prompt), None if unconditional
    settings: dict = field(default_factory=dict)  # more settings that determine the pixels (guidance, prompts)
    record: dict = field(default_factory=dict)    # more samples.json entries ("prompts": one per image)

    def conds_for(self, indices) -> Optional[list]:
        return None if self.cond is None else [self.cond(k) for k in indices]



# --- schedulers --------------------------------------------------------------------------------------------------

def _ddim(cfg: dict, eta: float):
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(cfg), {"eta": eta}


def _ddpm(cfg: dict, eta: float):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(cfg), {}


def _dpm_solver_pp(cfg: dict, eta: float):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"), {}


def _pndm(cfg: dict, eta: float):
    from diffusers import PNDMScheduler
    return PNDMScheduler.from_config(cfg), {}


# name -> factory(pipeline scheduler config, eta) -> (scheduler, extra kwargs for scheduler.step)
SCHEDULERS: dict[str, Callable[[dict, float], tuple[Any, dict]]] = {
    "ddim": _ddim,                    # Song et al. 2021; eta = 0 is deterministic (the release samples DDIM-50, eta 0)
    "ddpm": _ddpm,                    # ancestral sampling of Ho et al. 2020
    "dpm-solver++": _dpm_solver_pp,   # Lu et al. 2022, multistep, deterministic
    "pndm": _pndm,                    # Liu et al. 2022 (Stable Diffusion v1's default)
}


def make_scheduler(name: str, config: dict, eta: float = 0.0):
    """A fresh scheduler built from the pretrained pipeline's scheduler config; returns (scheduler, step kwargs)."""
    try:
        factory = SCHEDULERS[name]
    except KeyError:
        raise UsageError(f"unknown scheduler '{name}' (known: {', '.join(SCHEDULERS)})") from None
    scheduler, step_kw = factory(config, eta)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kw["_wants_generator"] = True
    return scheduler, step_kw


# --- precision -------------------------------------------------------------------------------------------------

def _autocast(precision: str, device):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


@contextlib.contextmanager
def shared_rows(modules: Sequence[Any]) -> Iterator[None]:
    """Compute 2-D linear layers whose input rows are all equal (the timestep embedding) on one row.

    Same values, less work, and the result no longer depends on how many rows there are (CPU BLAS picks other
    kernels for other batch sizes).
    """
    import torch
    import torch.nn.functional as F

    def hook(mod, args, out):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            return F.linear(x[:1], mod.weight, mod.bias).expand_as(out)
        return out

    handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- denoisers ---------------------------------------------------------------------------------------------------

class UNetDenoiser:
    """An unconditional (pixel-space) UNet or DemeModel: epsilon = model(x, t).sample; images are x itself."""

    def __init__(self, model, size: Optional[int] = None):
        self.model = model
        cfg = model.config
        size = cfg.sample_size or size                # some configs leave sample_size unset: the caller's size
        if size is None:
            raise UsageError("the UNet config has no sample_size; set data.resolution to the image size it makes")
        size = size if isinstance(size, int) else size[0]
        self.sample_shape = (int(cfg.in_channels), int(size), int(size))

    @property
    def modules(self) -> list:
        return [self.model]

    @property
    def calls(self) -> Optional[list]:
        """Calls per range model of a routed model (the ensemble), else None."""
        calls = getattr(self.model, "calls", None)
        return list(calls) if calls is not None else None

    def condition(self, conds: Optional[Sequence[Any]]) -> Any:
        return None

    dtype = None                                      # weights dtype after cast(); None: as loaded (autocast)

    def __call__(self, x, t, ctx):
        """ctx: extra UNet keyword arguments (text embeddings for Stable Diffusion), or None."""
        return self.model(x if self.dtype is None else x.to(self.dtype), t, **(ctx or {})).sample

    def decode(self, x):
        return x

    def cast(self, dtype) -> None:
        """Sample with a copy of the model whose weights are `dtype` (half precision without autocast's casts)."""
        from .models import model_copy

        self.model, self.dtype = model_copy(self.model, dtype), dtype

    def compile(self) -> None:
        import torch
        self.model = torch.compile(self.model, backend=compile_backend())


# --- the denoising loop ------------------------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
    """Model-space images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounded as diffusers does."""
    import torch

    x = ((images.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for s in range(0, n, batch_size):
        yield list(range(s, min(s + batch_size, n)))


def generate_batches(denoiser, scheduler_name: str, steps: int, seeds: Sequence[int], *, scheduler_config: dict,
                     conds: Optional[Sequence[Any]] = None, eta: float = 0.0, batch_size: int = 64,
                     precision: str = "auto", device=None, compile: bool = False
                     ) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (positions in `seeds`, uint8 images (n, H, W, C)) batch by batch. See `generate`."""
    import torch

    device = device if device is not None else next(denoiser.modules[0].parameters()).device
    precision = resolve_precision(precision, device)
    # Half precision: UNets that can be cast run on a half-precision copy of their weights without autocast (GroupNorm
    # and the residual adds stay in half precision too: faster, as diffusers pipelines do with torch_dtype=float16);
    # the rest (text-to-image encoders, the VAE decode) runs under autocast.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = half is not None and hasattr(denoiser, "cast")
    if cast:
        denoiser.cast(half)
    if compile:
        denoiser.compile()
    exact = device.type == "cpu" and not compile
    C, H, W = denoiser.sample_shape
    with torch.no_grad(), (shared_rows(denoiser.modules) if exact else contextlib.nullcontext()):
        for pos in _batches(len(seeds), batch_size):
            rows = pos + [pos[-1]] * (batch_size - len(pos))     # pad to a full batch; the copies are dropped
            gens = [torch.Generator("cpu").manual_seed(int(seeds[k])) for k in rows]
            scheduler, step_kw = make_scheduler(scheduler_name, scheduler_config, eta)
            wants_gen = step_kw.pop("_wants_generator", False)
            scheduler.set_timesteps(steps, device=device)
            x = torch.cat([torch.randn((1, C, H, W), generator=g) for g in gens]).to(device)
            x = x * scheduler.init_noise_sigma
            ctx = denoiser.condition([conds[k] for k in rows] if conds is not None else None)
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(x, t)
                with contextlib.nullcontext() if cast else _autocast(precision, device):
                    eps = denoiser(inp, t, ctx)
                kw = dict(step_kw, generator=gens) if wants_gen else step_kw
                x = scheduler.step(eps.float(), t, x, **kw).prev_sample
            with _autocast(precision, device):
                images = denoiser.decode(x)
            yield pos, to_uint8(images[:len(pos)])


def generate(denoiser, scheduler_name: str, steps: int, seeds: Sequence[int], *, scheduler_config: dict,
             conds: Optional[Sequence[Any]] = None, eta: float = 0.0, batch_size: int = 64, precision: str = "auto",
             device=None, compile: bool = False, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Generate len(seeds) images in memory: image j starts from torch.Generator(seeds[j]); returns uint8 (N, H, W, C).

    `denoiser`: a UNetDenoiser (or any object with the denoiser interface); `conds`: one condition
    per image (prompts, for text-to-image denoisers); `progress(n)` is called after every batch of n images.
    """
    out: list[Optional[np.ndarray]] = [None] * len(seeds)
    for pos, images in generate_batches(denoiser, scheduler_name, steps, seeds, scheduler_config=scheduler_config,
                                        conds=conds, eta=eta, batch_size=batch_size, precision=precision,
                                        device=device, compile=compile):
        for j, img in zip(pos, images):
            out[j] = img
        if progress is not None:
            progress(len(pos))
    return np.stack(out) if out else np.zeros((0, 0, 0, 0), np.uint8)
