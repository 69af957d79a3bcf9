"""deme sample: schedulers, per-image seeds (batch invariance), ensemble routing, resume, bad input."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import read_pngs
from deme_cli.engine.errors import UsageError


@pytest.fixture(scope="module")
def base(tiny_ddpm):
    from deme_cli.engine.models import load_base, scheduler_config

    return load_base(str(tiny_ddpm)).eval(), scheduler_config(tiny_ddpm)


def test_scheduler_registry(tiny_ddpm):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

    from deme_cli.engine.models import scheduler_config
    from deme_cli.engine.denoise import SCHEDULERS, make_scheduler

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
    from deme_cli.engine.denoise import UNetDenoiser, generate

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
    from deme_cli.engine.denoise import UNetDenoiser, generate

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
    """The routed model (deme_unet.DemeUNet, what the ensemble is) sends each call to the range model whose [lo, hi)
    holds t: three UNets whose forward is replaced by a constant that records the timesteps it sees."""
    from deme_cli.engine.deme_unet import DemeUNet
    from deme_cli.engine.models import load_unet, scheduler_config
    from deme_cli.engine.ranges import Range
    from deme_cli.engine.denoise import UNetDenoiser, generate

    ranges = [Range(0, 0, 250), Range(1, 250, 600), Range(2, 600, 1000)]
    fakes = [_Const(0.1), _Const(0.2), _Const(0.3)]
    unets = [load_unet(tiny_ddpm) for _ in fakes]
    for unet, fake in zip(unets, fakes):
        unet.forward = lambda x, t, return_dict=True, fake=fake: fake(x, t)
    ens = DemeUNet.from_models(unets, None, [(r.lo, r.hi) for r in ranges])
    assert [ens.owners(t, 1)[0][0] for t in (0, 249, 250, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    cfg = scheduler_config(tiny_ddpm)
    out = generate(UNetDenoiser(ens), "ddim", 10, [0, 1, 2], scheduler_config=cfg, batch_size=2)   # t = 900, ..., 0
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

    from deme_cli.engine.models import load_base, save_model_folder, unet_hash
    from deme_cli.commands.split import run_split

    rs = run_split(recipe, run)["ranges"]
    for r in rs:
        m = load_base(recipe.model.pretrained, projection=True)
        with torch.no_grad():
            for p in m.projections.parameters():
                p.mul_(1.0 + 0.05 * (r["index"] + 1))
        save_model_folder(run.final(r["index"]), m, {"base_hash": unet_hash(m.unet), "range": r, "recipe": "tiny"})
    return rs


def test_run_sample_writes_pngs_grid_and_json_and_resumes(make_recipe):
    from deme_cli.engine.runs import RunDir, read_json
    from deme_cli.commands.sample import run_sample
    from deme_cli.engine.images import existing_images

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
    from deme_cli.engine.runs import RunDir, read_json
    from deme_cli.commands.sample import run_sample
    from deme_cli.engine.images import existing_images

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


# --- merged and ensemble samples against models built by hand from the run directory --------------------------------
#
# The reference side never calls deme: it reads the model folders with diffusers and safetensors, applies the
# channel-wise projections itself (W @ h over the channels of the hidden states leaving every down block, the mid
# block and every up block; the skips untouched: DESIGN.md section 1) and denoises with diffusers' own DDIMPipeline or
# a loop over diffusers' DDIMScheduler. Range models get distinct random weights and far-from-identity projections, so
# that a dropped projection or a model serving the wrong range changes most pixels, not a few.

ENS_BOUNDS = [0, 250, 750, 1000]      # hand-written ranges.json; DDIM-4 steps t = 750, 500, 250, 0 hit every boundary
PIXEL_TOL = 0.5 + 0.02                # engine uint8 vs 255 * reference float: rounding plus float-order noise


def _projection_keys(config) -> dict:
    """Projection weight names and channels from the UNet config: the spec's layout, written out by hand."""
    boc = list(config.block_out_channels)
    keys = {f"down.{j}.weight": c for j, c in enumerate(boc)}
    keys["mid.0.weight"] = boc[-1]
    keys.update({f"up.{j}.weight": c for j, c in enumerate(boc[::-1])})
    return keys


def _hand_unet(folder):
    """A model folder's UNet without its projections, loaded without deme: diffusers' UNet2DModel with the weights of
    unet/ (deme's older layout: a stock UNet folder) or unet/model-0/unet.safetensors (a DemeUNet folder)."""
    import json

    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    own = folder / "unet" / "model-0"
    if not own.is_dir():
        return UNet2DModel.from_pretrained(folder / "unet").eval()
    cfg = {k: v for k, v in json.loads((folder / "unet" / "config.json").read_text()).items()
           if k not in ("deme", "unet_class") and not k.startswith("_")}
    unet = UNet2DModel.from_config(cfg)
    unet.load_state_dict(load_file(str(own / "unet.safetensors")))
    return unet.eval()


def _hand_model(folder):
    """A model folder loaded without deme: _hand_unet, its projections (projection.safetensors) applied by forward
    hooks written here (einsum over channels; down blocks: the hidden states only, not the skip tuple)."""
    import torch
    from safetensors.torch import load_file

    unet = _hand_unet(folder)
    own = folder / "unet" / "model-0" / "projection.safetensors"
    W = {k: v[:, :, 0, 0] for k, v in load_file(str(own if own.is_file() else folder / "projection.safetensors")).items()}
    assert set(W) == set(_projection_keys(unet.config))

    def proj(w):
        return lambda h: torch.einsum("oc,bchw->bohw", w, h)

    for j, block in enumerate(unet.down_blocks):
        block.register_forward_hook(lambda m, a, out, p=proj(W[f"down.{j}.weight"]): (p(out[0]),) + tuple(out[1:]))
    unet.mid_block.register_forward_hook(lambda m, a, out, p=proj(W["mid.0.weight"]): p(out))
    for j, block in enumerate(unet.up_blocks):
        block.register_forward_hook(lambda m, a, out, p=proj(W[f"up.{j}.weight"]): p(out))
    return unet


def _hand_ddim(pick, pipe, steps: int, seeds) -> np.ndarray:
    """DDIM (eta 0) with diffusers' scheduler; `pick(t)` gives the UNet for step t. Images (N, H, W, C) in [0, 255]."""
    import json

    import torch
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(json.loads((pipe / "scheduler" / "scheduler_config.json").read_text()))
    sched.set_timesteps(steps)
    x = torch.cat([torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(pick(int(t))(x, t).sample, t, x).prev_sample
    return ((x / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1).numpy()


def _assert_same_images(got: np.ndarray, want: np.ndarray) -> None:
    """got (uint8 PNG values) = want (255 * a float image) to PIXEL_TOL; most values strictly inside (0, 255), so
    the comparison is not one of saturated images."""
    assert ((got > 0) & (got < 255)).mean() > 0.5
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert err.max() <= PIXEL_TOL, f"max |diff| {err.max():.2f}, {(err > 2).mean():.0%} of values off by more than 2"


def _assert_other_images(got: np.ndarray, other: np.ndarray) -> None:
    """Most values differ: what a wrong model would produce is far outside the tolerance."""
    assert (np.abs(got - other) > 2).mean() > 0.2


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, tiny_ddpm, tiny_images):
    """A run directory written by hand: ranges.json with uneven ranges and ranges/<i>/final/ in deme's older layout
    (unet/, projection.safetensors, deme.json; deme still reads it) holding randomly perturbed UNets and
    projections."""
    import json

    import torch
    from diffusers import UNet2DModel
    from safetensors.torch import save_file

    from deme_cli.engine.models import unet_hash
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.runs import RunDir

    root = tmp_path_factory.mktemp("ensemble") / "run"
    recipe = recipe_from_dict({
        "name": "ens", "seed": 0, "model": {"pretrained": str(tiny_ddpm)},
        "data": {"source": "imagefolder", "path": str(tiny_images), "resolution": 16},
        "ranges": {"n": 3}, "merge": {"weights": [0.2, 0.3, 0.5]},
        "sample": {"scheduler": "ddim", "steps": 4, "num_images": 5, "batch_size": 3, "seed": 11},
        "output": {"dir": str(root)}})
    run = RunDir(recipe.out_dir)
    ranges = [{"index": i, "lo": lo, "hi": hi} for i, (lo, hi) in enumerate(zip(ENS_BOUNDS, ENS_BOUNDS[1:]))]
    root.mkdir(parents=True)
    (root / "ranges.json").write_text(json.dumps({"strategy": "hand-written", "T": 1000, "n": 3, "ranges": ranges}))
    base = UNet2DModel.from_pretrained(tiny_ddpm / "unet")
    base_hash = unet_hash(base)
    for r in ranges:
        i = r["index"]
        unet = UNet2DModel.from_pretrained(tiny_ddpm / "unet")
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
        proj = {k: (torch.eye(c) + 0.4 * torch.randn(c, c, generator=g) / c ** 0.5).view(c, c, 1, 1)
                for k, c in _projection_keys(unet.config).items()}
        folder = root / "ranges" / str(i) / "final"
        unet.save_pretrained(folder / "unet")
        save_file(proj, str(folder / "projection.safetensors"))
        (folder / "deme.json").write_text(json.dumps({"export_format": 2, "weights": "ema", "range": r,
                                                      "base_hash": base_hash}))
    return recipe, run, ranges


def test_ensemble_samples_equal_a_hand_loop_routing_each_step_by_range(ensemble_run, tiny_ddpm):
    """`deme sample --model ensemble` on a run dir: every image equals DDIM run by hand with, at step t, the model of
    the range whose [lo, hi) holds t (uneven ranges; t = 750, 500, 250, 0 sit on the boundaries)."""
    from deme_cli.commands.sample import run_sample

    recipe, run, ranges = ensemble_run
    out = run_sample(recipe, run, "ensemble", force=True)
    got = read_pngs(run.samples("ensemble"))
    models = [_hand_model(run.final(r["index"])) for r in ranges]

    def router(members, holds=lambda t, r: r["lo"] <= t < r["hi"]):
        return lambda t: next(m for m, r in zip(members, ranges) if holds(t, r))

    seeds = [11 + k for k in range(5)]
    _assert_same_images(got, _hand_ddim(router(models), tiny_ddpm, 4, seeds))
    assert out["model_info"]["calls_per_range"] == [1 * 2, 2 * 2, 1 * 2]     # per batch: 0 | 500, 250 | 750
    # the comparison can tell the models apart: reversed order, or t = hi counted in (off by one), give other images
    _assert_other_images(got, _hand_ddim(router(models[::-1]), tiny_ddpm, 4, seeds))
    _assert_other_images(got, _hand_ddim(router(models, lambda t, r: r["lo"] <= t <= r["hi"]), tiny_ddpm, 4, seeds))


def test_merged_samples_equal_diffusers_ddim_with_the_projections_applied_by_hand(ensemble_run, tiny_ddpm):
    """`deme sample --model merged`: the images equal diffusers' DDIMPipeline on merged/'s UNet weights with its
    projections applied by hand; without the projections most pixels change."""
    import torch
    from diffusers import DDIMPipeline, DDPMScheduler

    from deme_cli.commands.merge import run_merge
    from deme_cli.commands.sample import run_sample

    recipe, run, _ = ensemble_run
    run_merge(recipe, run)
    run_sample(recipe, run, "merged", force=True)
    got = read_pngs(run.samples("merged"))
    sched = DDPMScheduler.from_pretrained(tiny_ddpm, subfolder="scheduler")

    def pipeline_images(unet):
        pipe = DDIMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        gens = [torch.Generator().manual_seed(11 + k) for k in range(5)]
        return pipe(batch_size=5, generator=gens, num_inference_steps=4, eta=0.0, output_type="np").images * 255

    _assert_same_images(got, pipeline_images(_hand_model(run.merged)))
    # the projections matter in this model: diffusers' UNet alone gives other images
    _assert_other_images(got, pipeline_images(_hand_unet(run.merged)))


# --- resume: the images made after an interruption are the images of an uninterrupted run --------------------------

def test_resumed_samples_equal_uninterrupted_ones(make_recipe, tmp_path, monkeypatch):
    """Sample 7 images uninterrupted (A). Sample them again (B), interrupted after the 5th PNG (the second batch of 3
    has 2 images written), then lose image 1 too and leave a truncated temporary file where a crash leaves one;
    re-running B makes exactly the missing images, and every PNG of B has A's bytes. DDPM draws noise at every step,
    so an image made with another image's seed, or in another position, shows."""
    from deme_cli.commands import sample
    from deme_cli.engine.runs import RunDir, read_json
    from deme_cli.commands.sample import run_sample
    from deme_cli.engine.images import existing_images

    settings = {"scheduler": "ddpm", "steps": 5, "num_images": 7, "batch_size": 3, "seed": 21}
    a = make_recipe(sample=settings, output={"dir": str(tmp_path / "A")})
    b = make_recipe(sample=settings, output={"dir": str(tmp_path / "B")})
    run_sample(a, RunDir(a.out_dir), "base")
    folder_a, folder_b = RunDir(a.out_dir).samples("base"), RunDir(b.out_dir).samples("base")

    real, saved = sample.save_png, []

    def crash_after_five(path, img, size):
        if len(saved) == 5:
            raise KeyboardInterrupt
        real(path, img, size)
        saved.append(path.name)

    monkeypatch.setattr(sample, "save_png", crash_after_five)
    with pytest.raises(KeyboardInterrupt):
        run_sample(b, RunDir(b.out_dir), "base")
    monkeypatch.setattr(sample, "save_png", real)
    assert sorted(existing_images(folder_b)) == [0, 1, 2, 3, 4]
    assert read_json(folder_b / "samples.json")["complete"] is False
    (folder_b / "000001.png").unlink()
    (folder_b / ".000005.png.tmp").write_bytes((folder_a / "000005.png").read_bytes()[:40])
    kept = {k: p.stat().st_mtime_ns for k, p in existing_images(folder_b).items()}

    out = run_sample(b, RunDir(b.out_dir), "base")
    assert (out["generated"], out["skipped"], out["complete"]) == (3, 4, True)    # images 1, 5, 6
    have_a, have_b = existing_images(folder_a), existing_images(folder_b)
    assert sorted(have_b) == sorted(have_a) == list(range(7))
    assert all(have_b[k].stat().st_mtime_ns == kept[k] for k in kept)             # kept images are not rewritten
    for k in range(7):
        assert have_b[k].read_bytes() == have_a[k].read_bytes(), f"image {k} differs from the uninterrupted run's"
    assert len({have_a[k].read_bytes() for k in range(7)}) == 7
    assert not list(folder_b.glob(".*.tmp"))
