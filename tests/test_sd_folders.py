"""Stable Diffusion model folders (issue 25): pipeline folders that the stock StableDiffusionPipeline loads with the
folder's own UNet code (trust_remote_code=True) in a process where deme cannot be imported, the routed ensemble as a
StableDiffusionPipeline, and LoRA range models in diffusers' own LoRA format (`pipe.load_lora_weights(folder)`).

Two tiny SD runs (conftest.build_tiny_sd; 2 ranges, 2 steps at a large lr): full range models with projections, and
LoRA range models without (deme.projection = false), each merged (task arithmetic) and, in a copy, routed.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_pngs
from deme_cli.commands.merge import run_merge
from deme_cli.commands.sample import run_sample
from deme_cli.commands.train import run_train
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir
from test_pipeline_folders import fresh

SEED, N, STEPS, GUIDANCE, NEGATIVE = 7, 2, 3, 3.0, "a dog"


def sd_runs(root: Path, tiny_sd, lr: float, **deme) -> tuple:
    d = {"name": "tiny-sd", "seed": 0, "model": {"pretrained": str(tiny_sd["pipeline"])},
         "data": {"source": "imagefolder", "path": str(tiny_sd["images"]), "resolution": 16}, "ranges": {"n": 2},
         "train": {"steps": 3, "batch_size": 4, "lr": lr, "mixed_precision": "no", "checkpoint_every": 2},
         "deme": deme,
         "sample": {"prompts": str(tiny_sd["prompts"]), "guidance_scale": GUIDANCE, "negative_prompt": NEGATIVE,
                    "scheduler": "ddim", "steps": STEPS, "num_images": N, "batch_size": N, "seed": SEED},
         "output": {"dir": str(root / "run")}}
    recipe = recipe_from_dict(d)
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    run_merge(recipe, run)
    for m in ("base", "merged", "range:0", "ensemble"):
        run_sample(recipe, run, m)
    shutil.copytree(run.root, root / "routed")
    d["output"]["dir"], d["merge"] = str(root / "routed"), {"method": "routed"}
    routed = recipe_from_dict(d)
    run_merge(routed, RunDir(routed.out_dir), force=True)
    run_sample(routed, RunDir(routed.out_dir), "merged", force=True)
    return recipe, run, RunDir(routed.out_dir)


@pytest.fixture(scope="module")
def full_sd(tmp_path_factory, tiny_sd):
    return sd_runs(tmp_path_factory.mktemp("sdfull"), tiny_sd, 5e-3, projection=True)


@pytest.fixture(scope="module")
def lora_sd(tmp_path_factory, tiny_sd):
    return sd_runs(tmp_path_factory.mktemp("sdlora"), tiny_sd, 5e-2, projection=False, adapter="lora", lora_rank=4,
                   lora_alpha=8.0)


def job(folder: Path, samples: Path, save_to=None) -> dict:
    prompts = json.loads((samples / "samples.json").read_text())["prompts"]
    return {"folder": str(folder), "pngs": [str(samples / f"{k:06d}.png") for k in range(N)], "seed": SEED,
            "steps": STEPS, "prompts": prompts, "guidance": GUIDANCE, "negative": NEGATIVE,
            "save_to": str(save_to) if save_to else None}


@pytest.mark.parametrize("which", ["full_sd", "lora_sd"])
def test_sd_folders_load_as_stable_diffusion_pipelines_without_deme(which, request, tmp_path, tiny_sd):
    recipe, run, rrun = request.getfixturevalue(which)
    jobs = [job(run.final(0), run.samples("range:0"), tmp_path / "again-final"),
            job(rrun.merged, run.samples("ensemble"), tmp_path / "again-routed")]
    if which == "full_sd":
        jobs.append(job(run.merged, run.samples("merged"), tmp_path / "again-merged"))
    first = fresh(jobs, tmp_path)
    assert [r["max_diff"] for r in first] == pytest.approx([0.0] * len(jobs), abs=1.0), first
    assert {r["pipeline"] for r in first} == {"StableDiffusionPipeline"} and {r["unet_class"] for r in first} == \
        {"DemeUNet"}
    again = fresh([{**j, "folder": j["save_to"], "save_to": None} for j in jobs], tmp_path)
    assert [r["max_diff"] for r in again] == pytest.approx([0.0] * len(jobs), abs=1.0), again
    # the base's other components are hard links to its files, not copies
    for part in ("vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert os.path.samefile(run.final(0) / part, tiny_sd["pipeline"] / part)
        assert os.path.samefile(rrun.merged / part, tiny_sd["pipeline"] / part)
    assert np.abs(read_pngs(run.samples("ensemble")) - read_pngs(run.samples("base"))).max() > 8


@pytest.mark.parametrize("which", ["full_sd", "lora_sd"])
def test_sd_routed_merge_is_the_ensemble(which, request):
    recipe, run, rrun = request.getfixturevalue(which)
    assert np.array_equal(read_pngs(rrun.samples("merged")), read_pngs(run.samples("ensemble")))


def test_lora_range_models_load_with_load_lora_weights(lora_sd, tiny_sd):
    """The base StableDiffusionPipeline plus final/pytorch_lora_weights.safetensors (diffusers' own LoRA loader)
    samples what `deme sample --model range:0` samples (deme.projection = false)."""
    from diffusers import StableDiffusionPipeline

    recipe, run, rrun = lora_sd
    assert (run.final(0) / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd["pipeline"], safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(run.final(0))
    assert any(pipe.get_list_adapters().values())
    pipe.set_progress_bar_config(disable=True)
    prompts = json.loads((run.samples("range:0") / "samples.json").read_text())["prompts"]
    got = pipe(prompts, negative_prompt=[NEGATIVE] * N, guidance_scale=GUIDANCE, num_inference_steps=STEPS,
               generator=[torch.Generator().manual_seed(SEED + k) for k in range(N)], output_type="np").images
    got = np.round(np.asarray(got, np.float64) * 255)
    assert np.abs(got - read_pngs(run.samples("range:0"))).max() <= 1
    assert np.abs(got - read_pngs(run.samples("base"))).max() > 8          # the adapter is applied, not ignored
