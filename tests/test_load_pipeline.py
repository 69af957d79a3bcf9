"""`deme_cli.load_pipeline`: a run's base, merged, range and ensemble models as stock diffusers pipelines, making the
images `deme sample` writes, with the projections attached (and moved by `pipe.to`)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import read_pngs, tiny_recipe_dict
from deme_cli import load_pipeline
from deme_cli.commands.merge import run_merge
from deme_cli.commands.sample import run_sample
from deme_cli.commands.train import run_train
from deme_cli.engine import adapters, models
from deme_cli.engine.errors import UsageError
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir

SPECS = ("base", "merged", "range:0", "ensemble")
SEED, N, STEPS = 3, 2, 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_ddpm, tiny_images):
    """A 2-range run trained with a large lr (4 steps per range), merged, each model of SPECS sampled with DDIM-4;
    the recipe file is written like a user's."""
    root = tmp_path_factory.mktemp("use")
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, root / "run")
    d["train"].update(lr=1e-2)
    d["sample"] = {"scheduler": "ddim", "steps": STEPS, "num_images": N, "batch_size": N, "seed": SEED}
    recipe = recipe_from_dict(d)
    (root / "recipe.toml").write_text(recipe.to_toml())
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    run_merge(recipe, run)
    for m in SPECS:
        run_sample(recipe, run, m)
    return root / "recipe.toml", run


def generators(n=N, seed=SEED):
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def pipe_images(pipe, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=N, num_inference_steps=STEPS, generator=generators(), output_type="np", **kw).images
    return np.round(np.asarray(out, np.float64) * 255)


@pytest.mark.parametrize("spec", SPECS)
def test_the_pipeline_makes_the_images_deme_sample_writes(trained, spec):
    from diffusers import DDIMPipeline

    recipe_file, run = trained
    pipe = load_pipeline(recipe_file, model=spec)
    assert type(pipe) is DDIMPipeline
    got, want = pipe_images(pipe), read_pngs(run.samples(spec))
    # deme's loop computes the timestep embedding on one row (denoise.shared_rows): the last float bit may differ
    assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01
    if spec != "base":     # a large lr moved every model: the comparison would see a missing model or projection
        assert np.abs(read_pngs(run.samples("base")) - want).max() > 8


def unet_out(unet, t, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        return unet(x, torch.tensor(t)).sample


def test_the_pipeline_unet_is_the_engines_model_with_its_projections(trained, tiny_ddpm):
    recipe_file, run = trained
    merged = load_pipeline(recipe_file, model="merged").unet
    engine = adapters.load_model(run.merged).eval()
    assert type(merged).__name__ == "DemeUNet"                    # the class the folder ships (unet/deme_unet.py)
    assert torch.equal(unet_out(merged, 600), unet_out(engine, 600))
    without = engine.unet                                         # the same UNet weights, no projections
    engine.detach_projections()
    assert not torch.allclose(unet_out(merged, 600), unet_out(without, 600), atol=1e-4)
    assert not torch.allclose(unet_out(merged, 600), unet_out(models.load_unet(tiny_ddpm).eval(), 600), atol=1e-4)

    ens = load_pipeline(recipe_file, model="ensemble").unet
    for i, t in ((0, 100), (1, 900)):                             # ranges [0, 500) and [500, 1000)
        want = unet_out(adapters.load_model(run.final(i)).eval(), t)
        assert torch.equal(unet_out(ens, t), want)
    assert ens.calls == [1, 1]
    mixed = unet_out(ens, [100, 900])                             # rows with different t: each row by its range
    r0, r1 = (adapters.load_model(run.final(i)).eval() for i in range(2))
    assert torch.allclose(mixed[:1], unet_out(r0, 100)[:1], atol=1e-5)          # (a batch of 1: other kernels)
    assert torch.allclose(mixed[1:], unet_out(r1, 900)[1:], atol=1e-5)
    assert not torch.allclose(mixed[1:], unet_out(r0, 900)[1:], atol=1e-3)


def test_a_run_directory_loads_and_pipe_to_casts_the_projections(trained):
    recipe_file, run = trained
    run.resolved_recipe.write_text(recipe_file.read_text())      # what the CLI writes when a command ends
    pipe = load_pipeline(run.root, model="range:1")
    want = unet_out(pipe.unet, 700)
    pipe.to(torch.float64)             # the projections are a submodule of the UNet: cast with it, no dtype mismatch
    assert pipe.unet.models[0].projections.up[0].weight.dtype == torch.float64
    assert torch.allclose(unet_out(pipe.unet, 700, torch.float64).float(), want, atol=1e-4)
    images = load_pipeline(run.root, model="base")(batch_size=1, num_inference_steps=2).images
    assert len(images) == 1 and images[0].size == (16, 16)


def test_other_schedulers_sample_as_deme_does(trained):
    """scheduler="ddpm" gives a DDPMPipeline whose images are deme's loop's with the same per-image noise."""
    from diffusers import DDPMPipeline

    from deme_cli.engine.denoise import UNetDenoiser, generate
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.recipe import load_recipe

    recipe_file, run = trained
    pipe = load_pipeline(recipe_file, model="merged", scheduler="ddpm")
    assert type(pipe) is DDPMPipeline
    base = resolve_base(load_recipe(recipe_file).model)
    want = generate(UNetDenoiser(adapters.load_model(run.merged).eval()), "ddpm", STEPS,
                    [SEED + k for k in range(N)], scheduler_config=base.scheduler_config, batch_size=N,
                    precision="fp32", device=torch.device("cpu")).astype(np.float64)
    got = pipe_images(pipe)
    assert np.abs(got - want).max() <= 1 and np.mean(got != want) < 0.01


def test_bad_input_is_one_usage_error(trained, tmp_path):
    recipe_file, run = trained
    with pytest.raises(UsageError, match="unknown model 'merge'"):
        load_pipeline(recipe_file, model="merge")
    with pytest.raises(UsageError, match="range 2 does not exist"):
        load_pipeline(recipe_file, model="range:2")
    with pytest.raises(UsageError, match="not a deme run directory"):
        load_pipeline(tmp_path, model="merged")
    with pytest.raises(UsageError, match="no unconditional pipeline"):
        load_pipeline(recipe_file, model="merged", scheduler="pndm")
    with pytest.raises(UsageError, match="unknown scheduler"):
        load_pipeline(recipe_file, model="merged", scheduler="euler")


def test_importing_deme_cli_stays_free_of_torch():
    code = ("import sys, deme_cli; f = deme_cli.load_pipeline; assert callable(f); "
            "sys.exit(1 if 'torch' in sys.modules or 'diffusers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    with pytest.raises(AttributeError):
        import deme_cli
        deme_cli.no_such_name


def test_stable_diffusion_gives_its_pipeline_and_images(tiny_sd, tmp_path):
    """The base of a tiny SD run: a StableDiffusionPipeline whose images are `deme sample`'s for the same prompts,
    seeds and guidance; an ensemble UNet routes SD's calls (keyword arguments, return_dict=False) by t."""
    from diffusers import StableDiffusionPipeline

    from deme_cli.engine.deme_unet import DemeUNet
    from deme_cli.engine.ranges import Range

    d = {"name": "tiny-sd", "model": {"pretrained": str(tiny_sd["pipeline"])},
         "data": {"path": str(tiny_sd["images"]), "resolution": 16}, "ranges": {"n": 2},
         "sample": {"prompts": str(tiny_sd["prompts"]), "guidance_scale": 3.0, "negative_prompt": "a dog",
                    "scheduler": "ddim", "steps": 3, "num_images": 2, "batch_size": 2, "seed": 7},
         "output": {"dir": str(tmp_path / "run")}}
    recipe = recipe_from_dict(d)
    (tmp_path / "sd.toml").write_text(recipe.to_toml())
    run_sample(recipe, RunDir(recipe.out_dir), "base")
    pipe = load_pipeline(tmp_path / "sd.toml", model="base")
    assert type(pipe) is StableDiffusionPipeline
    pipe.set_progress_bar_config(disable=True)
    kw = dict(negative_prompt=["a dog"] * 2, guidance_scale=3.0, num_inference_steps=3, output_type="np")
    got = pipe(["the cat", "the dog"], generator=[torch.Generator().manual_seed(7 + k) for k in range(2)], **kw).images
    want = read_pngs(RunDir(recipe.out_dir).samples("base"))
    assert np.abs(np.round(np.asarray(got, np.float64) * 255) - want).max() <= 1

    pipe.unet = DemeUNet.from_models([pipe.unet, models.load_unet(tiny_sd["pipeline"]).eval()], None,
                                     [(r.lo, r.hi) for r in (Range(0, 0, 500), Range(1, 500, 1000))])
    images = pipe("the cat", **{**kw, "negative_prompt": "a dog", "output_type": "pil"}).images
    assert len(images) == 1 and pipe.unet.calls[0] > 0 and pipe.unet.calls[1] > 0
