"""Training previews: a grid of a few images from the range's EMA model every train.preview_every steps.

`Previews(base, trainer, train=..., sample=..., seed=..., resolution=..., folder=...)` is made once per range on the
main process; `write(step)` samples train.preview_images images and writes them as one grid,
`<run>/ranges/<i>/previews/step-<k>.png`, and sends it to the tracker (tracking.py). The sampler is the engine's
(model_specs.sample_images): DDIM with train.preview_steps steps and eta 0, in fp32, image k from seed + k (the
recipe's seed), so a resumed range draws the same previews as an uninterrupted one. Text-to-image models use
`[sample]`'s prompts and guidance; without sample.prompts, the first captions of the training data (written to
previews/prompts.txt).

The preview model is the student itself with the EMA weights copied in (trainer.EMA.applied), in eval mode; its own
weights and training mode come back exactly afterwards (without train.ema the raw weights are previewed). Sampling
draws its noise from its own generators, and the global and device RNG states are restored after it anyway, so a
run with previews trains exactly as one without.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import numpy as np

from . import tracking
from .errors import UsageError
from .images import save_grid
from .model_specs import in_memory, sample_images
from .runs import write_atomic

PREVIEW_DIR = "previews"          # under ranges/<i>/
PROMPTS_FILE = "prompts.txt"      # the captions a text-to-image preview uses when sample.prompts is unset


def preview_file(folder: Path, step: int) -> Path:
    return Path(folder) / f"step-{step}.png"


class Previews:
    """The preview grids of one range (see the module docstring)."""

    def __init__(self, base, trainer, *, train, sample, seed: int, resolution: int, folder: Path):
        """trainer     the range's trainer.RangeTrainer (its student, EMA and device)
        train       [train]: preview_images, preview_steps
        sample      [sample]: prompts, guidance and negative prompt of a text-to-image model
        seed        the recipe's seed: image k starts from seed + k
        resolution  data.resolution, pixels (the sample size of UNets whose config has none)
        folder      where the grids go: <run>/ranges/<i>/previews"""
        self.base, self.trainer, self.seed, self.resolution, self.folder = base, trainer, seed, resolution, Path(folder)
        n = train.preview_images
        self.sample = sample.model_copy(update={
            "scheduler": "ddim", "eta": 0.0, "steps": train.preview_steps, "num_images": n, "batch_size": n,
            "precision": "fp32", "compile": "off", **self._prompts(sample, n)})
        self._loaded = None           # the sampling wrapper of the student (text-to-image: encoders), made once

    def _prompts(self, sample, n: int) -> dict:
        """sample.prompts, or for a text-to-image model without them the first n captions of the training data."""
        if not self.base.kind.conditional or sample.prompts:
            return {}
        captions = [" ".join(c.split()) for c in getattr(self.trainer.task, "captions", [])]
        captions = [c for c in captions if c][:n]
        if not captions:
            raise UsageError("train.preview_every needs prompts for a text-to-image model, and the training data has "
                             "no non-empty captions; set sample.prompts")
        path = self.folder / PROMPTS_FILE
        write_atomic(path, "".join(c + "\n" for c in captions))
        return {"prompts": str(path)}

    def write(self, step: int) -> np.ndarray:
        """Sample the preview of `step` with the EMA weights, write its grid and log it; returns the grid (uint8)."""
        import torch

        tr = self.trainer
        model, device = tr.unwrapped(), tr.acc.device
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        training = model.training
        with torch.random.fork_rng(devices=cuda), (tr.ema.applied(tr.params) if tr.ema is not None else nullcontext()):
            model.eval()
            try:
                if self._loaded is None:
                    self._loaded = in_memory(model, self.base, self.sample, self.resolution, device)
                images = sample_images(model, self.base, self.sample, self.resolution, self.sample.num_images,
                                       seed=self.seed, device=device, loaded=self._loaded)
            finally:
                model.train(training)
        grid = save_grid(images, preview_file(self.folder, step))
        tracking.log_image(tr.acc, grid, step)
        return grid
