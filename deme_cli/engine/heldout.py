"""Held-out denoising losses: fixed images, noise and timesteps, shared by every model they score.

Two users: `deme eval` with metric "loss" (the loss in equal timestep bins, as a ratio to the base model: where a
model gains and where it loses) and the merge weight search's "loss" / "range_loss" objectives. Both need the same
thing: n images of a folder (evenly spaced through it, centre-cropped, no flips), one noise draw and one timestep per
image, fixed by a seed, so that the difference between two models' losses is the models' difference and nothing else.

The loss of image k is the mean squared error of the model's prediction against the target of the scheduler's
prediction type (the denoising term of Eq. 5, without the consistency term), in float64 on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import UsageError


# --- timesteps: one per image ------------------------------------------------------------------------------------

def spread_timesteps(n: int, T: int, seed: int = 0):
    """t_k = floor((k + 1/2) T / n): n timesteps spread evenly over [0, T) (the search's; `seed` is unused)."""
    import torch

    k = torch.arange(n, dtype=torch.float64)
    return ((k + 0.5) * T / n).floor().long().clamp(0, T - 1)


def equal_bins(T: int, bins: int) -> list[tuple[int, int]]:
    """[lo, hi) of `bins` equal timestep bins over [0, T): lo_b = floor(b T / bins)."""
    if not 1 <= bins <= T:
        raise UsageError(f"eval.loss_bins must be between 1 and T = {T}, got {bins}")
    return [(b * T // bins, (b + 1) * T // bins) for b in range(bins)]


def binned_timesteps(n: int, T: int, bins: int, seed: int):
    """Image k draws its timestep uniformly inside bin k mod `bins` (seeded): every bin holds n / bins images."""
    import torch

    edges = equal_bins(T, bins)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    lo = torch.tensor([edges[k % bins][0] for k in range(n)], dtype=torch.float64)
    hi = torch.tensor([edges[k % bins][1] for k in range(n)], dtype=torch.float64)
    return (lo + (u * (hi - lo)).floor()).long().clamp(max=T - 1)


# --- the held-out set --------------------------------------------------------------------------------------------

@dataclass
class HeldOut:
    """Fixed (x0, UNet kwargs, t, noise) batches on `device`, and the noise scheduler that makes x_t and targets."""
    batches: list
    scheduler: Any
    device: Any
    indices: list[int]
    source: str
    seed: int
    timesteps_rule: str
    t: Any = field(default=None)          # every image's timestep, CPU, in order

    @property
    def n(self) -> int:
        return len(self.indices)

    def describe(self) -> dict:
        return {"images": self.source, "num_images": self.n, "timesteps": self.timesteps_rule,
                "noise_seed": self.seed}


def load_heldout(base, data, folder: str, unet, device, *, num_images: Optional[int], seed: int,
                 timesteps: Callable[[int, int], Any], timesteps_rule: str, batch_size: int, what: str,
                 cache_dir: Optional[Path] = None) -> HeldOut:
    """The held-out set of `folder` (an image folder; for text-to-image models with captions, read as `[data]` reads
    training data, latents cached under `cache_dir` when data.cache_latents).

    `timesteps(n, T)` gives the n timesteps; noise comes from one generator seeded with `seed`, drawn once for all
    images (so it does not depend on the batch size). `what` names the recipe key in errors."""
    import torch

    ref = Path(folder).expanduser()
    if not ref.is_dir():
        raise UsageError(f"{what} '{folder}' is not a folder; point it at a held-out image folder")
    data = data.model_copy(update={"source": "imagefolder", "path": str(ref), "max_samples": None,
                                   "center_crop": True, "random_flip": False, "caption_dropout": 0.0,
                                   "cache_latents": data.cache_latents and cache_dir is not None})
    task = base.kind.task(base, unet, data, seed=seed, device=device, cache_dir=cache_dir, batch_size=batch_size)
    dataset = task.dataset()
    n = len(dataset) if num_images is None else min(num_images, len(dataset))
    if num_images is not None and n < num_images:
        from . import ui
        ui.warn(f"{what} '{folder}' holds {len(dataset)} images, fewer than the {num_images} asked for; using {n}")
    indices = sorted({int(i) for i in np.linspace(0, len(dataset) - 1, n).round()})
    n = len(indices)
    scheduler, T = base.noise_scheduler(), base.T
    t_all = timesteps(n, T).long()
    gen = torch.Generator().manual_seed(seed)
    items = [dataset[(i, 0)] for i in indices]
    batches, noise_all = [], None
    for b in range(0, n, batch_size):
        x0, kwargs = task.prepare(torch.utils.data.default_collate(items[b:b + batch_size]))
        if noise_all is None:
            noise_all = torch.randn((n,) + tuple(x0.shape[1:]), generator=gen)
        noise = noise_all[b:b + x0.shape[0]].to(x0.device, x0.dtype)
        batches.append((x0, kwargs, t_all[b:b + x0.shape[0]].to(x0.device), noise))
    return HeldOut(batches, scheduler, device, indices, f"{what} ({ref})", seed, timesteps_rule, t_all)


# --- losses ------------------------------------------------------------------------------------------------------

Predict = Callable[[Any, Any, dict], Any]          # (x_t, t, unet kwargs) -> the model's prediction


def model_predict(model) -> Predict:
    """A UNet, DemeModel or routed DemeUNet (each row to the range model owning its t) as a Predict."""
    return lambda x_t, t, kwargs: model(x_t, t, **kwargs).sample


def per_image_losses(predict: Predict, held: HeldOut):
    """The n per-image losses (mean squared error against the prediction-type target), float64, CPU, in order."""
    import torch

    from .loss import noisy_and_target

    out = []
    with torch.no_grad():
        for x0, kwargs, t, noise in held.batches:
            x_t, target = noisy_and_target(held.scheduler, x0, noise, t)
            err = (predict(x_t, t, kwargs).float() - target.float()).pow(2)
            out.append(err.flatten(1).mean(1))
    return torch.cat(out).double().cpu()      # one device-to-host copy per call


def load_binned(base, data, folder: str, unet, device, *, bins: int, seed: int, num_images: Optional[int],
                batch_size: int, what: str, images_key: str, cache_dir: Optional[Path] = None):
    """The held-out set of the loss by timestep: image k with one noise draw and a timestep uniform in bin k mod `bins`
    (both seeded by `seed`). Returns (held, edges: the bins' [lo, hi), counts: images per bin); every bin must hold an
    image (UsageError naming `what`, the folder's recipe key, and `images_key`, the key that sets how many are
    scored)."""
    held = load_heldout(base, data, folder, unet, device, num_images=num_images, seed=seed,
                        timesteps=lambda n, T: binned_timesteps(n, T, bins, seed),
                        timesteps_rule=f"image k: uniform in bin k mod {bins} (seed {seed})",
                        batch_size=batch_size, what=what, cache_dir=cache_dir)
    edges = equal_bins(int(held.scheduler.config.num_train_timesteps), bins)
    counts = [int(((held.t >= lo) & (held.t < hi)).sum()) for lo, hi in edges]
    if min(counts) == 0:
        raise UsageError(f"{what} gives {held.n} images, fewer than eval.loss_bins = {bins}; score more images "
                         f"({images_key}) or use fewer bins")
    return held, edges, counts


def bin_losses(predict: Predict, held: HeldOut, edges: Sequence[tuple[int, int]]) -> list[float]:
    """A model's mean held-out loss in each bin of `edges` (the loss by timestep)."""
    return binned_means(per_image_losses(predict, held), held.t, edges)


def binned_means(losses, t, edges: Sequence[tuple[int, int]]) -> list[float]:
    """Mean of `losses` over the images whose t falls in each [lo, hi) of `edges`."""
    out = []
    for lo, hi in edges:
        rows = ((t >= lo) & (t < hi)).nonzero().flatten()
        if len(rows) == 0:
            raise UsageError(f"no held-out image has its timestep in [{lo}, {hi}); score more images or use fewer "
                             f"bins")
        out.append(float(losses[rows].mean()))
    return out
