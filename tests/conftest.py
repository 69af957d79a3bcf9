"""Shared fixtures: tiny models and images built offline from configs (random weights), once per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8)


def write_shapes(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n RGB PNGs of coloured rectangles on black with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(60, 255, 3)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{k:04d}.png")
    return folder


def build_ddpm(folder: Path, **overrides) -> Path:
    """Save a tiny DDPM pipeline (UNet2DModel + DDPMScheduler, T = 1000) with random weights."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, **overrides})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory) -> Path:
    return build_ddpm(tmp_path_factory.mktemp("ddpm") / "pipe")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("images") / "train", 32, 16)


@pytest.fixture
def make_recipe(tmp_path, tiny_ddpm, tiny_images):
    """make_recipe(**sections) -> a validated Recipe for the tiny DDPM; sections override the defaults below."""
    from deme_cli.recipe import recipe_from_dict

    def make(**sections):
        base = {
            "name": "tiny", "seed": 0,
            "model": {"pretrained": str(tiny_ddpm)},
            "data": {"source": "imagefolder", "path": str(tiny_images), "resolution": 16},
            "ranges": {"n": 2},
            "train": {"steps": 4, "batch_size": 4, "lr": 1e-4, "mixed_precision": "no", "checkpoint_every": 2},
            "deme": {"p": 0.3, "consistency_weight": 1.0, "projection": True},
            "output": {"dir": str(tmp_path / "run")},
        }
        for k, v in sections.items():
            base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return recipe_from_dict(base)

    return make
