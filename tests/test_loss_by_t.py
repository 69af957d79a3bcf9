"""`eval.metrics = ["loss"]`: held-out loss by timestep bin, as a ratio to the base, for base, range:I, merged and
ensemble; checked against a second implementation written here from the documented rule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deme_cli.commands.eval import run_eval
from deme_cli.engine import models
from deme_cli.engine.errors import UsageError
from deme_cli.engine.runs import RunDir
from deme_cli.commands.train import run_train

BINS = 10


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_ddpm, tiny_images, heldout_images):
    """Two ranges, 3 steps each at a large lr (so every model differs from the base), and a uniform merge."""
    from deme_cli.commands.merge import run_merge
    from deme_cli.engine.recipe import recipe_from_dict

    root = tmp_path_factory.mktemp("lossrun") / "run"
    recipe = recipe_from_dict({
        "name": "tiny", "model": {"pretrained": str(tiny_ddpm)},
        "data": {"path": str(tiny_images), "resolution": 16}, "ranges": {"n": 2},
        "train": {"steps": 3, "batch_size": 4, "lr": 2e-3, "mixed_precision": "no", "checkpoint_every": 3},
        "merge": {"weights": [0.5, 0.5]},
        "eval": {"metrics": ["loss"], "reference": str(heldout_images), "loss_bins": BINS, "batch_size": 5},
        "output": {"dir": str(root)}})
    run = RunDir(root)
    run_train(recipe, run, None)
    run_merge(recipe, run)
    return recipe, run


def _hand_losses(recipe, model, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-image losses by the documented rule, computed without deme's held-out code: every image of the folder,
    image k with t uniform in bin k mod B (torch.rand seeded with eval.loss_seed), noise from one randn draw with
    the same seed, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with the linear betas of the tiny DDPM."""
    files = sorted(folder.glob("*.png"))
    x0 = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32)).permute(2, 0, 1)
                      for f in files]) / 127.5 - 1.0
    n, seed = len(files), recipe.eval.loss_seed
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lo = np.array([(k % BINS) * 1000 // BINS for k in range(n)])
    hi = np.array([((k % BINS) + 1) * 1000 // BINS for k in range(n)])
    t = (torch.from_numpy(lo) + (u * torch.from_numpy(hi - lo)).floor()).long()
    eps = torch.randn((n, 3, 16, 16), generator=torch.Generator().manual_seed(seed))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    with torch.no_grad():
        pred = model(x_t, t).sample
    return ((pred - eps) ** 2).flatten(1).mean(1).double().numpy(), t.numpy()


def _binned(losses, t) -> list[float]:
    return [float(losses[(t >= b * 1000 // BINS) & (t < (b + 1) * 1000 // BINS)].mean()) for b in range(BINS)]


def test_loss_by_t_against_a_hand_computation(trained_run, heldout_images, tiny_ddpm):
    recipe, run = trained_run
    res = run_eval(recipe, run, ["base", "range:0", "range:1", "merged", "ensemble"])["results"]
    base_rec = res["base"]["loss_by_t"]
    assert base_rec["ratio"] == [1.0] * BINS and res["base"]["metrics"]["loss_ratio"] == 1.0
    assert base_rec["bins"] == [[b * 100, (b + 1) * 100] for b in range(BINS)]
    assert sum(base_rec["images_per_bin"]) == 12 and min(base_rec["images_per_bin"]) >= 1

    base_hand = _binned(*_hand_losses(recipe, models.load_base(str(tiny_ddpm)), heldout_images))
    assert base_rec["loss"] == pytest.approx(base_hand, rel=1e-5)
    for spec, folder in (("range:0", run.final(0)), ("range:1", run.final(1)), ("merged", run.merged)):
        hand = _binned(*_hand_losses(recipe, models.load_model_folder(folder), heldout_images))
        rec = res[spec]["loss_by_t"]
        assert rec["loss"] == pytest.approx(hand, rel=1e-5), spec
        assert rec["ratio"] == pytest.approx([a / b for a, b in zip(hand, base_hand)], rel=1e-5)
        assert rec["ratio"] != [1.0] * BINS                     # the finetuned models do differ from the base
        assert res[spec]["metrics"]["loss_ratio"] == pytest.approx(sum(rec["ratio"]) / BINS)
    # the ensemble: model i serves the bins of range i ([0, 500) and [500, 1000)), and only those
    ens, r0, r1 = (res[m]["loss_by_t"]["loss"] for m in ("ensemble", "range:0", "range:1"))
    assert ens[:5] == pytest.approx(r0[:5], rel=1e-6) and ens[5:] == pytest.approx(r1[5:], rel=1e-6)
    assert ens[:5] != pytest.approx(r1[:5], rel=1e-4) and ens[5:] != pytest.approx(r0[5:], rel=1e-4)
    # written where the contract says, with the plot
    on_disk = json.loads(run.eval_json("range:0").read_text())["loss_by_t"]
    assert on_disk["loss"] == res["range:0"]["loss_by_t"]["loss"]
    png = run.root / "eval" / "loss-by-t.png"
    assert png.is_file() and Image.open(png).size[0] > 300


def test_loss_by_t_does_not_depend_on_the_batch_size_and_is_reused(trained_run, capsys):
    recipe, run = trained_run
    a = run_eval(recipe, run, ["range:1"], force=True)["results"]["range:1"]["loss_by_t"]["loss"]
    other = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"batch_size": 3})})
    b = run_eval(other, run, ["range:1"], force=True)["results"]["range:1"]["loss_by_t"]["loss"]
    assert a == pytest.approx(b, rel=1e-6)
    capsys.readouterr()
    assert run_eval(other, run, ["range:1"])["scored"] == []               # up to date: not recomputed
    assert "loss by t up to date" in " ".join(capsys.readouterr().err.split())


def test_loss_needs_an_image_folder_reference(trained_run, tmp_path):
    recipe, run = trained_run
    npz = tmp_path / "stats.npz"
    np.savez(npz, mu=np.zeros(4), sigma=np.eye(4))
    for ref, match in ((str(npz), "must be an image folder"), (None, "eval.reference is not set")):
        bad = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"reference": ref})})
        with pytest.raises(UsageError, match=match):
            run_eval(bad, run, ["base"])
    few = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"loss_num_images": 4})})
    with pytest.raises(UsageError, match="fewer than eval.loss_bins"):
        run_eval(few, run, ["base"], force=True)


def test_cli_eval_loss_prints_the_bins_and_json_has_the_curves(trained_run):
    from typer.testing import CliRunner

    from deme_cli.cli import app

    recipe, run = trained_run
    f = run.root / "loss-recipe.toml"
    f.write_text(recipe.to_toml())
    r = CliRunner().invoke(app, ["eval", str(f), "--models", "base,ensemble", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["results"]["ensemble"]["loss_by_t"]["bins"][0] == [0, 100]
    assert out["loss_plot"].endswith("eval/loss-by-t.png")
    r = CliRunner().invoke(app, ["eval", str(f), "--models", "base,ensemble"])
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "held-out loss by timestep" in text and "[900, 1000)" in text
    assert "mean of ratios" in text


def test_models_from_another_base_are_refused(trained_run, tmp_path):
    """A ratio to a base the model was not finetuned from would mislead (as after swapping model.pretrained)."""
    import shutil

    recipe, run = trained_run
    other = RunDir(tmp_path / "copy")
    shutil.copytree(run.root, other.root)
    meta_file = other.final(1) / "deme.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "base_hash": "0123456789abcdef"}))
    moved = recipe.model_copy(update={"output": recipe.output.model_copy(update={"dir": str(other.root)})})
    for spec in ("range:1", "ensemble"):
        with pytest.raises(UsageError, match="finetuned from (another|different) base model"):
            run_eval(moved, other, ["base", spec], force=True)
    run_eval(moved, other, ["range:0"], force=True)          # the untouched range is still scored


def test_a_routed_merge_scores_the_ensembles_loss(trained_run, tmp_path):
    """merged/ of `deme merge --method routed` is the ensemble: the same loss in every bin (rows of a batch with
    different t go to their own range models)."""
    import shutil

    from deme_cli.commands.merge import run_merge

    recipe, run = trained_run
    root = tmp_path / "routed"
    shutil.copytree(run.root, root)
    routed = recipe.model_copy(update={"merge": recipe.merge.model_copy(update={"method": "routed"})})
    run_merge(routed, RunDir(root), force=True)
    res = run_eval(routed, RunDir(root), ["merged", "ensemble"], force=True)["results"]
    assert res["merged"]["loss_by_t"]["loss"] == res["ensemble"]["loss_by_t"]["loss"]
    assert res["merged"]["metrics"]["loss_ratio"] == res["ensemble"]["metrics"]["loss_ratio"] != 1.0
