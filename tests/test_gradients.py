"""analyze-gradients: timestep grids, parameter selection, sketches against exact cosines, outputs, bad input."""
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import hand_alphas_cumprod
from deme_cli.commands.analyze_gradients import run_analyze_gradients
from deme_cli.engine import gradients as G
from deme_cli.engine.errors import UsageError


def test_bin_grid_and_explicit_grid():
    t, e = G.bin_grid(1000, 4)
    assert e.tolist() == [0, 250, 500, 750, 1000] and t.tolist() == [124, 374, 624, 874]
    t, e = G.bin_grid(7, 7)
    assert t.tolist() == list(range(7)) and e.tolist() == list(range(8))
    for bad in (1, 0, 1001):
        with pytest.raises(UsageError):
            G.bin_grid(1000, bad)
    t, e = G.explicit_grid(1000, G.parse_timesteps("500,10,100,100"))
    assert t.tolist() == [10, 100, 500] and e.tolist() == [0, 55, 300, 1000]
    for bad in ("10", "10,1000", "-1,5", "5,x"):
        with pytest.raises(UsageError):
            G.explicit_grid(1000, G.parse_timesteps(bad))


def test_cosine_matrix_properties():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(7, 50)) + rng.normal(size=50)        # correlated rows
    s = G.cosine_matrix(v)
    assert np.array_equal(s, s.T) and np.all(np.diag(s) == 1.0) and s.min() >= -1 and s.max() <= 1
    assert s[0, 1] == pytest.approx(v[0] @ v[1] / np.linalg.norm(v[0]) / np.linalg.norm(v[1]))
    assert G.cosine_matrix(np.stack([v[0], -v[0]]))[0, 1] == pytest.approx(-1.0)
    with pytest.raises(UsageError):
        G.cosine_matrix(np.stack([v[0], np.zeros(50)]))


@pytest.fixture(scope="module")
def tiny_unet(tiny_ddpm):
    from deme_cli.engine.models import load_unet

    return load_unet(tiny_ddpm).eval()


def test_select_parameters(tiny_unet):
    all_ = G.select_parameters(tiny_unet, None)
    assert len(all_) == len(list(tiny_unet.parameters()))
    up = G.select_parameters(tiny_unet, "up_blocks.*")
    assert up and all(n.startswith("up_blocks.") for n, _ in up)
    both = G.select_parameters(tiny_unet, "up_blocks.*, conv_out.*")
    assert len(both) == len(up) + 2
    rx = G.select_parameters(tiny_unet, r"re:attentions\.\d+\.to_q")
    assert rx and all(".to_q." in n for n, _ in rx)
    for bad in ("nothing.*", "re:nothing", "re:("):
        with pytest.raises(UsageError):
            G.select_parameters(tiny_unet, bad)


def test_countsketch_matches_exact_on_a_small_model(tiny_unet):
    """The requirement: sketched cosines (k = 4096, the default) within 0.05 of the exact ones, on real gradients of
    the denoising loss. Same gradients go to both reducers, so only the sketch differs."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    params = G.select_parameters(tiny_unet, None)
    rows = {"exact": [], "countsketch": []}
    for t in (5, 120, 400, 990):
        grads, loss = G.denoising_gradient(tiny_unet, params, sched, x0, noise, t)
        assert np.isfinite(loss)
        for m in rows:
            rows[m].append(G.REDUCERS[m](grads, 4096, 0).numpy())
    exact, sketch = (G.cosine_matrix(np.stack(r)) for r in (rows["exact"], rows["countsketch"]))
    assert exact.min() < 0.9                                   # the cosines are not all trivially ~1
    assert np.abs(exact - sketch).max() < 0.05


def test_sketches_on_planted_vectors():
    """Both sketches preserve cosines spread over [-1, 1]; the projection is seeded (same seed, same sketch) and
    regenerated per parameter chunk, also across the CHUNK boundary."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(2, 6000))
    v = np.stack([base[0], 0.5 * base[0] + base[1], base[1], -base[0] + 0.2 * base[1]])
    exact = G.cosine_matrix(v)
    assert exact.min() < -0.5 and exact.max(initial=-1, where=~np.eye(4, dtype=bool)) > 0.3

    def as_grads(x):  # two "parameters" of a model
        t = torch.from_numpy(x).float()
        return [("a.weight", t[:4000].view(40, 100)), ("b.bias", t[4000:])]

    for name in ("countsketch", "gaussian"):
        sk = np.stack([G.REDUCERS[name](as_grads(x), 2048, 7).numpy() for x in v])
        assert np.abs(G.cosine_matrix(sk) - exact).max() < 0.05, name
        assert np.array_equal(G.REDUCERS[name](as_grads(v[0]), 2048, 7).numpy(), sk[0])
    old = G.CHUNK
    try:
        G.CHUNK = 1000       # many chunks per parameter
        sk = np.stack([G.countsketch(as_grads(x), 2048, 7).numpy() for x in v])
        assert np.abs(G.cosine_matrix(sk) - exact).max() < 0.05
    finally:
        G.CHUNK = old


def test_analyze_gradients_outputs_and_reuse(make_recipe):
    from deme_cli.engine.runs import RunDir

    recipe = make_recipe()
    run = RunDir(recipe.out_dir)
    kw = dict(bins=4, timesteps=None, params="up_blocks.*", method="exact", sketch_dim=64, batch_size=3)
    res = run_analyze_gradients(recipe, run, **kw)
    assert not res["reused"]
    m = G.load_matrix(run.analysis / G.NPZ_FILE)
    s = m["matrix"]
    assert s.shape == (4, 4) and np.allclose(s, s.T) and np.allclose(np.diag(s), 1) and np.abs(s).max() <= 1
    assert m["timesteps"].tolist() == [124, 374, 624, 874] and m["edges"].tolist() == [0, 250, 500, 750, 1000]
    st = m["settings"]
    assert st["method"] == "exact" and st["batch_size"] == 3 and st["params"] == "up_blocks.*" and st["seed"] == 0
    assert len(st["model_hash"]) == 16 and st["num_params"] > 0
    for f in (G.HEATMAP_FILE, G.HISTOGRAM_FILE):
        assert (run.analysis / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summ = res["summary"]
    assert summ["adjacent_mean"] == pytest.approx(np.mean(np.diag(s, 1)), abs=1e-4)
    assert summ["distant_pairs"] == 1 and summ["distant_mean"] == pytest.approx(s[0, 3], abs=1e-4)  # 750 > T/2

    # Same settings: reused, not recomputed. Other settings: refused without --force, nothing replaced.
    before = (run.analysis / G.NPZ_FILE).read_bytes()
    assert run_analyze_gradients(recipe, run, **kw)["reused"]
    with pytest.raises(UsageError, match="--force"):
        run_analyze_gradients(recipe, run, **{**kw, "bins": 3})
    assert (run.analysis / G.NPZ_FILE).read_bytes() == before
    run_analyze_gradients(recipe, run, **{**kw, "bins": 3}, force=True)
    assert G.load_matrix(run.analysis / G.NPZ_FILE)["matrix"].shape == (3, 3)


def _recipe_file(make_recipe, tmp_path):
    recipe = make_recipe()
    f = tmp_path / "recipe.toml"
    f.write_text(recipe.to_toml())
    return f, recipe


@pytest.mark.parametrize("args", [["--bins", "1"], ["--bins", "1001"], ["--params", "no_such_block.*"],
                                  ["--timesteps", "5,x"], ["--bins", "3", "--timesteps", "1,2"]])
def test_cli_bad_input_exit_2(make_recipe, tmp_path, args):
    from deme_cli.cli import app

    f, recipe = _recipe_file(make_recipe, tmp_path)
    r = CliRunner().invoke(app, ["analyze-gradients", str(f), "--batch-size", "2", *args])
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output and "error:" in r.output
    assert not (recipe.out_dir / "analysis" / G.NPZ_FILE).exists()


def test_cli_json_summary(make_recipe, tmp_path):
    from deme_cli.cli import app

    f, recipe = _recipe_file(make_recipe, tmp_path)
    r = CliRunner().invoke(app, ["analyze-gradients", str(f), "--timesteps", "10,500,990", "--params",
                                 "conv_out.*", "--batch-size", "2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["summary"]["bins"] == 3 and out["summary"]["distant_pairs"] == 1
    assert out["settings"]["timesteps"] == [10, 500, 990] and out["settings"]["method"] == "countsketch"


def test_analyze_gradients_text_to_image(tiny_sd, tmp_path):
    """Stable Diffusion: VAE latents and caption embeddings, as in training; the matrix has the same properties."""
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.runs import RunDir

    recipe = recipe_from_dict({"name": "sd", "model": {"pretrained": str(tiny_sd["pipeline"])},
                               "data": {"source": "imagefolder", "path": str(tiny_sd["images"]), "resolution": 16,
                                        "caption_column": "text", "caption_dropout": 0.5},
                               "output": {"dir": str(tmp_path / "run")}})
    res = run_analyze_gradients(recipe, RunDir(recipe.out_dir), bins=3, timesteps=None, params="up_blocks.1.*",
                              method="exact", sketch_dim=8, batch_size=2)
    s = G.load_matrix(RunDir(recipe.out_dir).analysis / G.NPZ_FILE)["matrix"]
    assert s.shape == (3, 3) and np.allclose(s, s.T) and np.allclose(np.diag(s), 1) and np.abs(s).max() <= 1
    assert res["settings"]["conditioning"] == ["encoder_hidden_states"]


def _hand_images(folder, indices):
    """The PNGs of `folder` (sorted names) at `indices` as a (n, 3, H, W) tensor in [-1, 1], read with PIL only."""
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    arrs = [np.asarray(Image.open(files[i]).convert("RGB"), dtype=np.float32) / 127.5 - 1.0 for i in indices]
    return torch.from_numpy(np.stack(arrs).transpose(0, 3, 1, 2).copy())


def test_matrix_is_the_cosine_of_hand_computed_gradients_per_bin(make_recipe, tiny_ddpm, tiny_images):
    """Every entry of the matrix (and the per-timestep loss and gradient norm) against gradients computed here with
    torch.autograd: the same images (read with PIL), the same noise (torch.randn seeded with recipe.seed), x_t made by
    hand from alphas_cumprod, each bin at its own timestep, the UNet loaded straight with diffusers."""
    from diffusers import UNet2DModel

    from deme_cli.engine.runs import RunDir

    recipe = make_recipe(seed=3)
    run = RunDir(recipe.out_dir)
    run_analyze_gradients(recipe, run, bins=4, timesteps=None, params=None, method="exact", sketch_dim=8, batch_size=3)
    with np.load(run.analysis / G.NPZ_FILE) as z:
        got, ts, loss, gnorm = z["matrix"], z["timesteps"], z["loss"], z["grad_norm"]
        images = json.loads(str(z["settings"]))["images"]
    assert ts.tolist() == [124, 374, 624, 874]

    unet = UNet2DModel.from_pretrained(tiny_ddpm / "unet").eval()
    params = [p for p in unet.parameters()]
    x0 = _hand_images(tiny_images, images)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    abar = hand_alphas_cumprod()
    rows, losses, norms = [], [], []
    for t in (124, 374, 624, 874):
        x_t = (math.sqrt(abar[t]) * x0.double() + math.sqrt(1 - abar[t]) * noise.double()).float()
        pred = unet(x_t, torch.full((3,), t)).sample
        mse = ((pred - noise) ** 2).mean()
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mse, params)]).double()
        rows.append(g)
        losses.append(float(mse.detach()))
        norms.append(float(g.norm()))
    want = np.array([[float(a @ b / (a.norm() * b.norm())) for b in rows] for a in rows])
    off = ~np.eye(4, dtype=bool)
    assert want[off].min() < 0.8 and want[off].max() < 0.99   # the bins' gradients really differ: a real test
    assert np.abs(got - want).max() < 1e-4, (got, want)
    assert loss == pytest.approx(losses, rel=1e-4) and gnorm == pytest.approx(norms, rel=1e-4)
