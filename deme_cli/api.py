"""deme from Python: `load_pipeline(RUN_OR_RECIPE, model=...)` gives a stock diffusers pipeline of a run's model.

    from deme_cli import load_pipeline
    pipe = load_pipeline("runs/quickstart", model="merged")      # or a recipe .toml; base | merged | range:I | ensemble
    images = pipe(batch_size=4, num_inference_steps=50).images   # PIL images, as diffusers' DDIMPipeline returns

The model is loaded as `deme sample --model` loads it (engine/model_specs.py: merged/, a range's final/ or final-raw/
by merge.use_ema, LoRA range models on their base), with its channel-wise projections; the pipeline is the model
kind's (engine/pipelines.py) with the recipe's `sample.scheduler` built from the base's scheduler config. With the same
seeds (`generator=[torch.Generator().manual_seed(seed + k) for k in range(batch_size)]`), scheduler and steps, the
pipeline makes the images `deme sample` writes, up to floating-point rounding (deme's own loop computes the timestep
embedding on one row, so that its images do not depend on the batch size: engine/denoise.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from .engine.errors import UsageError


def recipe_and_run(run_or_recipe: Union[str, Path]) -> tuple[Any, Any]:
    """(Recipe, RunDir) of a recipe .toml (its output.dir is the run) or a run directory (its recipe.resolved.toml)."""
    from .engine.recipe import load_recipe
    from .engine.runs import RunDir

    p = Path(run_or_recipe).expanduser()
    if p.is_dir():
        resolved = RunDir(p).resolved_recipe
        if not resolved.is_file():
            raise UsageError(f"'{p}' is not a deme run directory (it has no recipe.resolved.toml); give a run "
                             f"directory or the recipe's .toml file")
        return load_recipe(resolved, out=str(p)), RunDir(p)
    recipe = load_recipe(p)
    return recipe, RunDir(recipe.out_dir)


def load_pipeline(run_or_recipe: Union[str, Path], model: str = "merged", *, scheduler: Optional[str] = None,
                  device: Optional[str] = None, torch_dtype=None):
    """A diffusers pipeline that samples `model` of a run: call it as the stock pipeline (`pipe(batch_size=4,
    num_inference_steps=50)`; Stable Diffusion: `pipe("a prompt", num_inference_steps=50)`).

    run_or_recipe  a run directory (holding recipe.resolved.toml) or a recipe .toml (its output.dir is the run)
    model          base | merged | range:I | ensemble, as `deme sample --model` takes it
    scheduler      a name of engine/denoise.SCHEDULERS (default: the recipe's sample.scheduler)
    device         "cpu", "cuda", "cuda:1", ... (default: the recipe's train.device; auto = CUDA when available)
    torch_dtype    cast the pipeline's weights, e.g. torch.float16 (default: as stored, float32)
    """
    from .engine.base import resolve_base
    from .engine.denoise import make_scheduler
    from .engine.model_specs import check_model_spec, load_unets, spec_settings
    from .engine.pipelines import pipeline_unet

    recipe, run = recipe_and_run(run_or_recipe)
    check_model_spec(model, recipe.ranges.n)
    base = resolve_base(recipe.model, recipe.train.device)
    dev = base.device if device is None else _device(device)
    sched, _ = make_scheduler(scheduler or recipe.sample.scheduler, base.scheduler_config, recipe.sample.eta)
    build = base.kind.pipeline
    build(base, None, sched, dev, check_only=True)          # a scheduler the pipeline cannot use fails before loading
    loaded = load_unets(base, run, model, dev, **spec_settings(recipe.ranges, recipe.merge, recipe.data))
    pipe = build(base, pipeline_unet(loaded.denoiser), sched, dev)
    if torch_dtype is not None:
        pipe.to(torch_dtype)
    return pipe


def _device(name: str):
    import torch

    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"device '{name}' is not a torch device; use cpu, cuda or cuda:N") from None
