"""Samplers and prediction targets against diffusers' own pipelines and the hand formulas.

- Sampling: `deme sample` with each scheduler on a UNet whose scheduler predicts epsilon, v or x0 gives the images of
  diffusers' DDIMPipeline / DDPMPipeline / PNDMPipeline (or, for DPM-Solver++, which has no unconditional pipeline, a
  loop over diffusers' scheduler) built from the same pipeline folder, with one torch.Generator(seed + k) per image.
- Training: the denoising loss of the first optimizer step equals the mean squared error against the target of the
  pipeline's prediction_type computed by hand: epsilon, v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, or x0, with abar
  the cumulative product of DDPM's linear betas (1e-4 ... 0.02) in float64.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import trainer_for, hand_alphas_cumprod, read_pngs

PIXEL_TOL = 0.5 + 0.02         # engine uint8 vs 255 * the reference's float image: rounding plus float-order noise
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tiny_ddpm) -> dict:
    """The tiny DDPM pipeline with its scheduler set to predict epsilon, v or x0 (same UNet)."""
    out = {}
    for kind in PREDICTION_TYPES:
        folder = tmp_path_factory.mktemp(kind) / "pipe"
        shutil.copytree(tiny_ddpm, folder)
        f = folder / "scheduler" / "scheduler_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": kind}))
        out[kind] = folder
    return out


def _reference(scheduler: str, pipe, steps: int, seeds: list, prediction_type: str) -> np.ndarray:
    """Images (N, H, W, C) in [0, 255] from diffusers alone, the scheduler config's prediction_type replaced."""
    import torch
    from diffusers import (DDIMPipeline, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, PNDMPipeline,
                           PNDMScheduler, UNet2DModel)

    unet = UNet2DModel.from_pretrained(pipe / "unet").eval()
    cfg = {**json.loads((pipe / "scheduler" / "scheduler_config.json").read_text()), "prediction_type": prediction_type}
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if scheduler == "dpm-solver++":
        sched = DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++")
        sched.set_timesteps(steps)
        x = torch.cat([torch.randn((1, 3, 16, 16), generator=g) for g in gens]) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                x = sched.step(unet(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
        return ((x / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    make = {"ddim": lambda: DDIMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(cfg)),
            "ddpm": lambda: DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(cfg)),
            "pndm": lambda: PNDMPipeline(unet=unet, scheduler=PNDMScheduler.from_config(cfg))}[scheduler]
    p = make()
    p.set_progress_bar_config(disable=True)
    return p(batch_size=len(seeds), generator=gens, num_inference_steps=steps, output_type="np").images * 255


@pytest.mark.parametrize("scheduler,prediction_type", [
    ("pndm", "epsilon"), ("pndm", "v_prediction"), ("ddim", "v_prediction"), ("ddim", "sample"),
    ("ddpm", "v_prediction"), ("ddpm", "sample"), ("dpm-solver++", "v_prediction")])
def test_sample_equals_diffusers_for_scheduler_and_prediction_type(make_recipe, pipelines, scheduler,
                                                                   prediction_type):
    """`deme sample --model base` (batches of 2, so the 5 images span 3 batches) equals diffusers' own loop on the
    same pipeline folder; with the prediction type read as epsilon the images would differ (the test can see it)."""
    from deme_cli.engine.runs import RunDir
    from deme_cli.commands.sample import run_sample

    pipe, steps, seeds = pipelines[prediction_type], 6, [40 + k for k in range(5)]
    recipe = make_recipe(model={"pretrained": str(pipe)},
                         sample={"scheduler": scheduler, "steps": steps, "num_images": 5, "batch_size": 2, "seed": 40})
    run = RunDir(recipe.out_dir)
    run_sample(recipe, run, "base")
    got = read_pngs(run.samples("base"))
    want = _reference(scheduler, pipe, steps, seeds, prediction_type)
    if (scheduler, prediction_type) != ("pndm", "epsilon"):     # that one saturates: see the test below
        assert ((got > 0) & (got < 255)).mean() > 0.5                # not a comparison of saturated images
    assert got.shape == want.shape and np.abs(got - want).max() <= PIXEL_TOL
    if prediction_type != "epsilon":
        as_eps = _reference(scheduler, pipe, steps, seeds, "epsilon")
        assert (np.abs(got - as_eps) > 2).mean() > 0.2


def test_pndm_epsilon_loop_equals_diffusers_scheduler_before_clamping(pipelines):
    """PNDM (PRK warm-up, then PLMS) with epsilon prediction: on a random UNet it does not clip, so its images
    saturate; compare the engine's loop with diffusers' PNDMScheduler run by hand on x / 1000, before clamping."""
    import torch
    from diffusers import PNDMScheduler, UNet2DModel

    from deme_cli.engine.denoise import UNetDenoiser, generate
    from deme_cli.engine.models import load_base, scheduler_config

    class Scaled(UNetDenoiser):
        def decode(self, x):
            return x / 1000

    pipe, seeds = pipelines["epsilon"], [3, 4, 5]
    got = generate(Scaled(load_base(str(pipe)).eval()), "pndm", 6, seeds, scheduler_config=scheduler_config(pipe),
                   batch_size=2).astype(np.float64)
    unet = UNet2DModel.from_pretrained(pipe / "unet").eval()
    sched = PNDMScheduler.from_config(json.loads((pipe / "scheduler" / "scheduler_config.json").read_text()))
    sched.set_timesteps(6)
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    want = ((x / 1000 / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()
    assert len(sched.timesteps) > 6                                   # the PRK warm-up ran
    assert ((got > 0) & (got < 255)).mean() > 0.5
    assert np.abs(got - want).max() <= PIXEL_TOL


def _hand_target(kind: str, x0, eps, abar):
    return {"epsilon": eps, "v_prediction": abar.sqrt() * eps - (1 - abar).sqrt() * x0, "sample": x0}[kind]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_training_loss_uses_the_target_of_the_prediction_type(make_recipe, pipelines, prediction_type):
    """The first step's denoise_loss of a range trainer on the pipeline = mean (UNet(x_t, t) - target)^2 over its first
    micro-batch, with x_t = sqrt(abar) x0 + sqrt(1 - abar) eps and the target by hand. A twin trainer (same recipe,
    same seeds) yields that micro-batch; the prediction is a plain diffusers UNet (identity projections compute the
    same). The targets of the other prediction types give other losses, so a mix-up would show."""
    import torch
    from diffusers import UNet2DModel

    from deme_cli.engine.ranges import Range

    pipe = pipelines[prediction_type]
    recipe = make_recipe(model={"pretrained": str(pipe)},
                         train={"steps": 1, "batch_size": 4, "grad_accum": 1, "mixed_precision": "no",
                                "device": "cpu", "ema": False},
                         deme={"consistency_weight": 0.0})
    rng = Range(1, 500, 1000)                    # large t: epsilon, v and x0 differ most
    reported = trainer_for(recipe, rng).train_step()["denoise_loss"]
    x0, kwargs, t, eps = next(trainer_for(recipe, rng)._micro_batches([0, 0]))
    assert not kwargs
    abar = torch.from_numpy(hand_alphas_cumprod()[t.numpy()]).view(-1, 1, 1, 1)
    x0_, eps_ = x0.double(), eps.double()
    x_t = (abar.sqrt() * x0_ + (1 - abar).sqrt() * eps_).float()
    unet = UNet2DModel.from_pretrained(pipe / "unet").eval()
    with torch.no_grad():
        pred = unet(x_t, t).sample.double()
    losses = {k: float(((pred - _hand_target(k, x0_, eps_, abar)) ** 2).mean()) for k in PREDICTION_TYPES}
    assert reported == pytest.approx(losses[prediction_type], rel=1e-4)
    for k, v in losses.items():                  # 100x the tolerance: a wrong target cannot pass
        if k != prediction_type:
            assert abs(v - losses[prediction_type]) > 1e-2 * losses[prediction_type]
