"""Model folders as diffusers pipeline folders, and the routed ensemble as one model (issue 25).

A tiny DDPM run (2 ranges, a large lr so every model differs from the base), full range models with projections and
LoRA ones: merged/, ranges/<i>/final/ and a routed merged/ load with `DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)` in a process where deme cannot be imported and sample the PNGs `deme sample` wrote; the
stock UNet class refuses a UNet it cannot load whole; the routed merge samples what the ensemble samples; folders of
the older layout keep working and are rewritten on request.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import read_pngs, tiny_recipe_dict
from deme_cli.commands.merge import run_merge
from deme_cli.commands.sample import run_sample
from deme_cli.commands.train import run_train
from deme_cli.engine import adapters, models, pipeline_folders
from deme_cli.engine.deme_unet import DemeUNet
from deme_cli.engine.errors import UsageError
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir

SEED, N, STEPS = 3, 2, 4
FRESH = Path(__file__).with_name("fresh_load.py")


def make_run(root: Path, tiny_ddpm, tiny_images, **deme) -> tuple:
    """Train 2 ranges, merge them (task arithmetic), sample merged, range:0 and ensemble with DDIM-4; then copy the
    run and merge the copy with merge.method = "routed" and sample its merged/."""
    d = tiny_recipe_dict(tiny_ddpm, tiny_images, root / "run")
    d["train"].update(lr=1e-2)
    d["deme"].update(deme)
    d["sample"] = {"scheduler": "ddim", "steps": STEPS, "num_images": N, "batch_size": N, "seed": SEED}
    recipe = recipe_from_dict(d)
    run = RunDir(recipe.out_dir)
    run_train(recipe, run)
    run_merge(recipe, run)
    for m in ("merged", "range:0", "ensemble"):
        run_sample(recipe, run, m)
    shutil.copytree(run.root, root / "routed")
    d["output"]["dir"] = str(root / "routed")
    d["merge"] = {"method": "routed"}
    routed = recipe_from_dict(d)
    run_merge(routed, RunDir(routed.out_dir), force=True)
    run_sample(routed, RunDir(routed.out_dir), "merged", force=True)
    return recipe, run, routed, RunDir(routed.out_dir)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_ddpm, tiny_images):
    return make_run(tmp_path_factory.mktemp("full"), tiny_ddpm, tiny_images, projection=True)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_ddpm, tiny_images):
    return make_run(tmp_path_factory.mktemp("lora"), tiny_ddpm, tiny_images, projection=True, adapter="lora",
                    lora_rank=4, lora_alpha=8.0)


def pngs(folder: Path) -> list[str]:
    return [str(folder / f"{k:06d}.png") for k in range(N)]


def fresh(jobs: list[dict], tmp_path: Path) -> list[dict]:
    """tests/fresh_load.py on `jobs` in a new process (deme blocked from importing), its own modules cache."""
    spec = tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(FRESH), str(spec)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def job(folder: Path, samples: Path, save_to=None) -> dict:
    return {"folder": str(folder), "pngs": pngs(samples), "seed": SEED, "steps": STEPS,
            "save_to": str(save_to) if save_to else None}


@pytest.mark.parametrize("which", ["full_run", "lora_run"])
def test_folders_load_in_diffusers_without_deme_and_sample_what_deme_sampled(which, request, tmp_path):
    """merged/, ranges/0/final/ and the routed merged/ in a fresh process with deme blocked: the images of `deme
    sample` (merged, range:0, ensemble) to one grey level; saved with save_pretrained and loaded again, the same."""
    recipe, run, routed, rrun = request.getfixturevalue(which)
    jobs = [job(run.merged, run.samples("merged"), tmp_path / "again-merged"),
            job(run.final(0), run.samples("range:0"), tmp_path / "again-final"),
            job(rrun.merged, run.samples("ensemble"), tmp_path / "again-routed")]
    if which == "lora_run":
        jobs = jobs[1:]              # a LoRA run's task-arithmetic merge is a full UNet (checked by the full run)
    first = fresh(jobs, tmp_path)
    assert [r["max_diff"] for r in first] == pytest.approx([0.0] * len(jobs), abs=1.0), first
    assert {r["unet_class"] for r in first} == {"DemeUNet"} and {r["pipeline"] for r in first} == {"DDPMPipeline"}
    again = fresh([{**j, "folder": j["save_to"], "save_to": None} for j in jobs], tmp_path)
    assert [r["max_diff"] for r in again] == pytest.approx([0.0] * len(jobs), abs=1.0), again
    # the images are the trained models' own: far from the base's
    assert np.abs(read_pngs(run.samples("ensemble")) - read_pngs(run.samples("range:0"))).max() > 8


@pytest.mark.parametrize("which", ["full_run", "lora_run"])
def test_the_stock_unet_class_refuses_what_it_cannot_load_whole(which, request):
    from diffusers import UNet2DModel

    recipe, run, routed, rrun = request.getfixturevalue(which)
    for folder in (run.final(0), run.final(1, ema=False), rrun.merged):
        with pytest.raises(OSError, match="diffusion_pytorch_model"):
            UNet2DModel.from_pretrained(folder / "unet")
        assert json.loads((folder / "model_index.json").read_text())["unet"] == ["deme_unet", "DemeUNet"]
        assert (folder / "unet" / "deme_unet.py").is_file() and (folder / "scheduler").is_dir()


def test_routed_merge_is_the_ensemble(full_run):
    """deme sample --model merged of a routed merge makes the ensemble's images bit for bit; the folder routes by the
    ranges of ranges.json and links (does not copy) the range models' files."""
    recipe, run, routed, rrun = full_run
    assert np.array_equal(read_pngs(rrun.samples("merged")), read_pngs(run.samples("ensemble")))
    cfg = json.loads((rrun.merged / "unet" / "config.json").read_text())
    ranges = [[r["lo"], r["hi"]] for r in json.loads(rrun.ranges_json.read_text())["ranges"]]
    assert cfg["deme"]["ranges"] == ranges == [[0, 500], [500, 1000]] and cfg["deme"]["projection"] is True
    merge = json.loads((rrun.merged / "merge.json").read_text())
    assert merge["method"] == "routed" and merge["weights"] is None and merge["routing"] == ranges
    for i in range(2):
        for name in ("unet.safetensors", "projection.safetensors"):
            a, b = rrun.merged / "unet" / f"model-{i}" / name, rrun.final(i) / "unet" / "model-0" / name
            assert os.path.samefile(a, b)                    # a hard link: no disk of its own
    info = json.loads((rrun.samples("merged") / "samples.json").read_text())
    assert info["model_info"]["calls_per_range"] is None or sum(info["model_info"]["calls_per_range"]) > 0


def test_a_routed_model_splits_a_batch_of_mixed_timesteps_by_rows(full_run):
    recipe, run, routed, rrun = full_run
    model = DemeUNet.from_pretrained(rrun.merged / "unet")
    ranges = [adapters.load_model(run.final(i)).eval() for i in range(2)]
    x = torch.randn((5, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900, 499, 500, 999])
    with torch.no_grad():
        got = model(x, t).sample
        low, high = torch.tensor([0, 2]), torch.tensor([1, 3, 4])
        assert torch.equal(got[low], ranges[0](x[low], t[low]).sample)        # [0, 500): range 0, 499 included
        assert torch.equal(got[high], ranges[1](x[high], t[high]).sample)     # [500, 1000): range 1, 500 included
        assert model.calls == [1, 1]
        assert torch.equal(model(x[:2], torch.tensor(700)).sample, ranges[1](x[:2], torch.tensor(700)).sample)
        with pytest.raises(ValueError, match="outside every range"):
            model(x[:1], torch.tensor(1000))


def test_load_pipeline_gives_the_folder_s_model(full_run):
    from deme_cli import load_pipeline

    recipe, run, routed, rrun = full_run
    (rrun.root / "recipe.resolved.toml").write_text(routed.to_toml())
    (run.root / "recipe.resolved.toml").write_text(recipe.to_toml())
    for r, spec, samples in ((rrun, "merged", run.samples("ensemble")), (run, "ensemble", run.samples("ensemble")),
                             (run, "range:0", run.samples("range:0"))):
        pipe = load_pipeline(r.root, model=spec)
        assert type(pipe.unet).__name__ == "DemeUNet"
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=N, num_inference_steps=STEPS, output_type="np",
                   generator=[torch.Generator().manual_seed(SEED + k) for k in range(N)]).images
        assert np.abs(np.round(np.asarray(out, np.float64) * 255) - read_pngs(samples)).max() <= 1, spec


def test_routed_lora_holds_the_base_once_and_is_the_ensemble(lora_run):
    """LoRA range models routed: the base UNet once plus N adapters in memory, on disk links to the base's UNet files;
    its samples are the ensemble's bit for bit."""
    recipe, run, routed, rrun = lora_run
    assert np.array_equal(read_pngs(rrun.samples("merged")), read_pngs(run.samples("ensemble")))
    model = DemeUNet.from_pretrained(rrun.merged / "unet")
    base = models.load_unet(Path(recipe.model.pretrained))
    adapter = sum(t.numel() for t in adapters.read_adapter(run.final(0))[1].values())
    proj = sum(p.numel() for p in models.make_projections(base).parameters())
    n_base = sum(p.numel() for p in base.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_base + 2 * (adapter + proj)
    base_file = Path(recipe.model.pretrained) / "unet" / "diffusion_pytorch_model.safetensors"
    assert os.path.samefile(rrun.merged / "unet" / "base" / "diffusion_pytorch_model.safetensors", base_file)
    assert os.path.samefile(run.final(0) / "unet" / "base" / "diffusion_pytorch_model.safetensors", base_file)
    # switching range models leaves the base weights exactly as loaded
    x = torch.randn((2, 3, 16, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in (900, 10, 600):
            model(x, torch.tensor(t))
    state = model.state_dict()
    assert all(torch.equal(state[f"unet.{k}"], v) for k, v in base.state_dict().items())


def test_weights_do_not_apply_to_a_routed_merge(full_run, capsys, tmp_path):
    from deme_cli.commands.pipeline import run_pipeline

    recipe, run, routed, rrun = full_run
    with pytest.raises(UsageError, match="no weights to search"):
        run_merge(routed, rrun, search=True)
    out = run_merge(routed, rrun, weights=[0.3, 0.7])
    assert out["skipped"] and "ignored" in capsys.readouterr().err
    searched = routed.model_copy(update={"merge": routed.merge.model_copy(update={"weights": "search"}),
                                         "output": routed.output.model_copy(update={"dir": str(tmp_path / "r")})})
    with pytest.raises(UsageError, match="no weights to search.*checked before any stage starts"):
        run_pipeline(searched, RunDir(tmp_path / "r"))
    assert not (tmp_path / "r" / "ranges").exists()


def to_old_layout(folder: Path) -> None:
    """Rewrite a one-model folder in deme's older layout: stock unet/ + projection.safetensors, or lora/ (peft keys);
    no model_index.json."""
    from safetensors.torch import save_file

    files = pipeline_folders.folder_files(folder)
    if files.lora is not None:
        from safetensors.torch import load_file

        (folder / "lora").mkdir()
        save_file({"base_model.model." + k: v for k, v in load_file(str(files.lora)).items()},
                  str(folder / "lora" / "adapter_model.safetensors"))
        state = {}
    else:
        state = models.read_state(files)
    proj = {k[len("projections."):]: v for k, v in state.items() if k.startswith("projections.")}
    if files.projection is not None and not proj:
        from safetensors.torch import load_file
        proj = load_file(str(files.projection))
    cfg = dict(files.unet_config)
    shutil.rmtree(folder / "unet")
    for p in ("model_index.json", "scheduler"):
        shutil.rmtree(folder / p) if (folder / p).is_dir() else (folder / p).unlink()
    if state:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text(json.dumps({"_class_name": files.unet_class, **cfg}))
        save_file({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")},
                  str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    if proj:
        save_file(proj, str(folder / "projection.safetensors"))


@pytest.mark.parametrize("which", ["full_run", "lora_run"])
def test_folders_of_the_older_layout_keep_working_and_are_rewritten(which, request, tmp_path, capsys):
    recipe, run, routed, rrun = request.getfixturevalue(which)
    root = tmp_path / "old"
    shutil.copytree(run.root, root)
    old = RunDir(root)
    for i in range(2):
        for ema in (True, False):
            to_old_layout(old.final(i, ema))
    to_old_layout(old.merged) if which == "full_run" else None
    assert not (old.final(0) / "model_index.json").exists()
    before = models.state_hash(adapters.load_model(old.final(0), Path(recipe.model.pretrained)).state_dict())
    # sample and merge read them (and say once how to rewrite them)
    run_sample(recipe, old, "range:0", force=True)
    assert np.array_equal(read_pngs(old.samples("range:0")), read_pngs(run.samples("range:0")))
    assert "older folder layout" in capsys.readouterr().err
    # deme train rewrites finished ranges as pipeline folders without training, deme merge the merged/ folder
    run_train(recipe, old)
    assert "rewrote final and final-raw" in capsys.readouterr().err
    for i in range(2):
        assert pipeline_folders.folder_files(old.final(i)).layout == "pipeline"
    assert models.state_hash(adapters.load_model(old.final(0)).state_dict()) == before
    run_merge(recipe, old)
    assert (old.merged / "model_index.json").is_file()
    assert models.state_hash(adapters.load_model(old.merged).state_dict()) == \
        models.state_hash(adapters.load_model(run.merged).state_dict())
