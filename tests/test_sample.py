"""deme sample: schedulers, per-image seeds (batch invariance), ensemble routing, resume, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from deme_cli.errors import UsageError


@pytest.fixture(scope="module")
def base(tiny_ddpm):
    from deme_cli.models import load_base, scheduler_config

    return load_base(str(tiny_ddpm)).eval(), scheduler_config(tiny_ddpm)


def test_scheduler_registry(tiny_ddpm):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    from deme_cli.models import scheduler_config
    from deme_cli.denoise import SCHEDULERS, make_scheduler

    cfg = scheduler_config(tiny_ddpm)
    want = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm-solver++": DPMSolverMultistepScheduler,
            "pndm": PNDMScheduler}
    assert set(SCHEDULERS) == set(want)
    for name, cls in want.items():
        sched, kw = make_scheduler(name, cfg, eta=0.3)
        assert type(sched) is cls
        assert sched.config.num_train_timesteps == 1000
    assert make_scheduler("ddim", cfg, eta=0.3)[1]["eta"] == 0.3
    assert make_scheduler("dpm-solver++", cfg)[0].config.algorithm_type == "dpmsolver++"
    with pytest.raises(UsageError, match="unknown scheduler"):
        make_scheduler("euler", cfg)


@pytest.mark.parametrize("scheduler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpm-solver++", 0.0)])
def test_batch_8_vs_3_bit_identical(base, scheduler, eta):
    """Image k depends on seed + k only: batch 8 and batch 3 (3 + 3 + 2) give the same bytes."""
    from deme_cli.denoise import UNetDenoiser, generate

    model, cfg = base
    seeds = [100 + k for k in range(8)]
    a = generate(UNetDenoiser(model), scheduler, 4, seeds, scheduler_config=cfg, eta=eta, batch_size=8)
    b = generate(UNetDenoiser(model), scheduler, 4, seeds, scheduler_config=cfg, eta=eta, batch_size=3)
    assert a.dtype == np.uint8 and a.shape == (8, 16, 16, 3)
    assert np.array_equal(a, b)
    assert len({a[k].tobytes() for k in range(8)}) == 8          # different seeds, different images
    # one image alone (padded to the batch size) is the same image as in the full run
    c = generate(UNetDenoiser(model), scheduler, 4, [seeds[5]], scheduler_config=cfg, eta=eta, batch_size=3)
    assert np.array_equal(c[0], a[5])


def test_stochastic_samplers_use_per_step_noise(base):
    """DDIM with eta > 0 draws noise at every step (from the image's own generator), eta = 0 does not."""
    from deme_cli.denoise import UNetDenoiser, generate

    model, cfg = base
    a = generate(UNetDenoiser(model), "ddim", 4, [0, 1], scheduler_config=cfg, eta=0.0, batch_size=2)
    b = generate(UNetDenoiser(model), "ddim", 4, [0, 1], scheduler_config=cfg, eta=1.0, batch_size=2)
    assert not np.array_equal(a, b)


class _Const:
    """A fake UNet that returns a constant and records the timesteps it sees."""

    def __init__(self, value: float):
        import torch

        self.value, self.seen = value, []
        self.config = type("C", (), {"in_channels": 3, "sample_size": 8})()
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def modules(self):
        return iter([])

    def __call__(self, x, t):
        self.seen.append(int(t))
        return type("O", (), {"sample": x.new_full(x.shape, self.value)})()


def test_ensemble_routes_each_step_to_the_range_owning_t(tiny_ddpm):
    from deme_cli.models import scheduler_config
    from deme_cli.ranges import Range
    from deme_cli.denoise import EnsembleDenoiser, UNetDenoiser, generate

    ranges = [Range(0, 0, 250), Range(1, 250, 600), Range(2, 600, 1000)]
    fakes = [_Const(0.1), _Const(0.2), _Const(0.3)]
    ens = EnsembleDenoiser(fakes, ranges)
    assert [ens.route(t) for t in (0, 249, 250, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    cfg = scheduler_config(tiny_ddpm)
    out = generate(ens, "ddim", 10, [0, 1, 2], scheduler_config=cfg, batch_size=2)   # t = 900, 800, ..., 0
    for fake, r in zip(fakes, ranges):
        assert fake.seen and all(r.lo <= t < r.hi for t in fake.seen)
    assert sorted(set(fakes[0].seen)) == [0, 100, 200]
    assert sorted(set(fakes[1].seen)) == [300, 400, 500]
    assert sorted(set(fakes[2].seen)) == [600, 700, 800, 900]
    assert ens.calls == [3 * 2, 3 * 2, 4 * 2]                    # two batches
    # the routed outputs matter: a single model predicting one of the constants gives other images
    single = generate(UNetDenoiser(_Const(0.2)), "ddim", 10, [0, 1, 2], scheduler_config=cfg, batch_size=2)
    assert not np.array_equal(out, single)


def _fake_range_models(recipe, run):
    """Range models on disk without training: base weights with perturbed projections, plus ranges.json."""
    import torch

    from deme_cli.models import load_base, save_model_folder, unet_hash
    from deme_cli.splitting import run_split

    rs = run_split(recipe, run)["ranges"]
    for r in rs:
        m = load_base(recipe.model.pretrained, projection=True)
        with torch.no_grad():
            for p in m.projections.parameters():
                p.mul_(1.0 + 0.05 * (r["index"] + 1))
        save_model_folder(run.final(r["index"]), m, {"base_hash": unet_hash(m.unet), "range": r, "recipe": "tiny"})
    return rs


def test_run_sample_writes_pngs_grid_and_json_and_resumes(make_recipe):
    from deme_cli.runs import RunDir, read_json
    from deme_cli.sample import existing_images, run_sample

    recipe = make_recipe(sample={"steps": 3, "num_images": 4, "batch_size": 3, "seed": 7})
    run = RunDir(recipe.out_dir)
    r = run_sample(recipe, run, "base")
    folder = run.samples("base")
    assert sorted(existing_images(folder)) == [0, 1, 2, 3] and (folder / "grid.png").is_file()
    meta = read_json(folder / "samples.json")
    assert meta["complete"] and meta["generated"] == 4 and meta["precision"] == "fp32"
    assert meta["seeds"] == {"base": 7, "count": 4, "rule": "image k uses seed + k"}
    assert meta["scheduler"] == "ddim" and meta["steps"] == 3 and meta["model_info"]["hash"]
    first = {k: p.read_bytes() for k, p in existing_images(folder).items()}
    mtimes = {k: p.stat().st_mtime_ns for k, p in existing_images(folder).items()}

    # more images with the same settings: only the new ones are generated, the old ones are untouched
    more = make_recipe(sample={"steps": 3, "num_images": 6, "batch_size": 4, "seed": 7})
    r = run_sample(more, run, "base")
    assert (r["generated"], r["skipped"]) == (2, 4)
    assert all(existing_images(folder)[k].stat().st_mtime_ns == mtimes[k] for k in mtimes)

    # other settings: refused, nothing changed; --force regenerates (same seeds -> the same first images)
    other = make_recipe(sample={"steps": 2, "num_images": 6, "batch_size": 4, "seed": 7})
    with pytest.raises(UsageError, match="--force"):
        run_sample(other, run, "base")
    assert all(existing_images(folder)[k].stat().st_mtime_ns == mtimes[k] for k in mtimes)
    r = run_sample(more, run, "base", force=True)
    assert r["generated"] == 6
    assert all(existing_images(folder)[k].read_bytes() == first[k] for k in first)   # batch 3 vs 4: same bytes


def test_sample_ensemble_range_and_missing_models(make_recipe):
    from deme_cli.runs import RunDir, read_json
    from deme_cli.sample import existing_images, run_sample

    recipe = make_recipe(sample={"steps": 4, "num_images": 2, "batch_size": 2})
    run = RunDir(recipe.out_dir)
    with pytest.raises(UsageError, match="deme merge"):
        run_sample(recipe, run, "merged")
    with pytest.raises(UsageError, match="deme train"):
        run_sample(recipe, run, "ensemble")
    with pytest.raises(UsageError, match="range:1"):
        run_sample(recipe, run, "range:5")
    with pytest.raises(UsageError, match="unknown model"):
        run_sample(recipe, run, "biggest")
    assert not run.samples("merged").exists()

    _fake_range_models(recipe, run)
    r = run_sample(recipe, run, "ensemble")
    assert r["model_info"]["calls_per_range"] == [2, 2]        # DDIM-4: t = 750, 500 | 250, 0
    r1 = run_sample(recipe, run, "range:1")
    assert read_json(run.samples("range:1") / "samples.json")["model_info"]["meta"]["range"]["lo"] == 500
    ens = [p.read_bytes() for _, p in sorted(existing_images(run.samples("ensemble")).items())]
    one = [p.read_bytes() for _, p in sorted(existing_images(run.samples("range:1")).items())]
    assert ens != one and r1["model_info"]["hash"] != r["model_info"]["members"][0]["hash"]


def test_cli_sample_json(make_recipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from deme_cli.cli import app

    recipe = make_recipe(sample={"steps": 2, "num_images": 3, "batch_size": 3})
    path = tmp_path / "recipe.toml"
    path.write_text(recipe.to_toml())
    res = CliRunner().invoke(app, ["sample", str(path), "--model", "base", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["num_images"] == 3 and out["generated"] == 3 and out["images_per_s"] > 0
    res = CliRunner().invoke(app, ["sample", str(path), "--model", "range:x"])
    assert res.exit_code == 2 and "Traceback" not in res.output
