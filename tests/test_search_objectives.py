"""The merge weight search's sample objectives (merge.objective = "kid" / "fid"): a candidate's score is the metric of
the images it samples, computed by hand from the definitions, it ranks a nearer set of images better, and it is
what `deme eval` reports for the same images and reference."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import merge_inputs, search_setup, write_shapes
from deme_cli.engine.features import MODES
from deme_cli.engine import merge_methods, model_specs, models, search_pool
from deme_cli.engine.runs import RunDir
from test_metrics import features_by_hand, fid_by_hand, mmd2_by_hand

N = 2


@pytest.fixture(scope="module")
def feature_net(tmp_path_factory):
    """(TorchScript path, the same network) of an 8-feature random conv net: eval.feature_extractor for the search."""
    from nets import tiny_feature_net

    net = tiny_feature_net(dim=8, seed=3)
    path = tmp_path_factory.mktemp("extractor") / "net.pt"
    torch.jit.script(net).save(str(path))
    return path, net


@pytest.fixture(scope="module")
def ranges_dir(tmp_path_factory, tiny_ddpm):
    """A run dir with N range models (theta plus noise, projections identity plus noise), as `train` writes them."""
    root = tmp_path_factory.mktemp("search") / "run"
    base = models.load_unet(tiny_ddpm)
    h = models.unet_hash(base)
    gen = torch.Generator().manual_seed(0)
    for i in range(N):
        m = models.wrap(copy.deepcopy(base), True)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        meta = {"range": {"index": i, "lo": 1000 * i // N, "hi": 1000 * (i + 1) // N}, "base_hash": h,
                "recipe": "tiny", "weights": "ema"}
        models.save_model_folder(RunDir(root).final(i, ema=True), m, meta)
    return root


def _recipe(make_recipe, ranges_dir, tmp_path, heldout_images, feature_net, metric, n, mode="clean"):
    import shutil

    root = tmp_path / "run"
    shutil.copytree(ranges_dir, root)
    recipe = make_recipe(seed=5, ranges={"n": N}, sample={"batch_size": 16, "steps": 3},
                         merge={"objective": metric, "search_num_images": n, "search_steps": 2, "seed": 1,
                                "search_reference": str(heldout_images)},
                         eval={"feature_extractor": str(feature_net[0]), "mode": mode})
    return recipe, RunDir(root)


def _scored(recipe, run, weights, monkeypatch, planted=()):
    """Score each weight vector with the search's own evaluator; returns [(score, the uint8 images it sampled)].
    `planted`: image arrays to hand the objective instead of sampling (one per call, in order)."""
    calls, real = [], model_specs.sample_images
    planted = list(planted)

    def recording(model, base, sample, resolution, num_images, **kw):
        images = planted.pop(0) if planted else real(model, base, sample, resolution, num_images, **kw)
        calls.append((images, num_images, kw.get("steps")))
        return images

    monkeypatch.setattr(model_specs, "sample_images", recording)
    inputs = merge_inputs(recipe, run)
    with inputs.open():
        _, _, evaluate = search_pool.candidate_evaluator(search_setup(recipe), run, inputs,
                                                         merge_methods.MergeSpec.from_section(recipe.merge))
        scores = [evaluate(w) for w in weights]
    assert [c[1:] for c in calls] == [(recipe.merge.search_num_images, 2)] * len(weights)
    return [(s, c[0]) for s, c in zip(scores, calls)]


def _arrays(folder):
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in sorted(folder.glob("*.png"))])


@pytest.mark.parametrize("metric", ["kid", "fid"])
def test_sample_objective_is_the_metric_of_the_candidates_samples(metric, make_recipe, ranges_dir, tmp_path,
                                                                  heldout_images, feature_net, monkeypatch):
    """The score of a candidate is KID (the unbiased cubic-kernel MMD^2; 12 samples against the 12 held-out images,
    so every subset is the whole set) or FID (by hand, no sqrtm) between the features of the images it sampled and
    of merge.search_reference, both computed here from the images (resize by hand, the network loaded here). The
    objective ranks images like the reference better than noise, and different merges differently."""
    recipe, run = _recipe(make_recipe, ranges_dir, tmp_path, heldout_images, feature_net, metric, 12)
    by_hand = mmd2_by_hand if metric == "kid" else fid_by_hand
    net = feature_net[1]
    ref = features_by_hand(sorted(heldout_images.glob("*.png")), net, "clean")
    like = _arrays(write_shapes(tmp_path / "like", 12, 16, seed=11))
    noise = np.random.default_rng(0).integers(0, 256, (12, 16, 16, 3), dtype=np.uint8)
    sampled = _scored(recipe, run, [[0.5, 1.0], [1.0, 0.0]], monkeypatch)
    planted = _scored(recipe, run, [[0.5, 1.0], [0.5, 1.0]], monkeypatch, planted=[like, noise])
    for score, images in sampled + planted:
        assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
        assert score == pytest.approx(by_hand(features_by_hand(list(images), net, "clean"), ref), rel=1e-5, abs=1e-9)
    assert abs(sampled[0][0] - sampled[1][0]) > 1e-3 * abs(sampled[0][0])
    assert planted[0][0] < planted[1][0]


@pytest.mark.parametrize("mode", MODES)
def test_sample_objectives_equal_deme_eval_of_the_same_images(mode, make_recipe, ranges_dir, tmp_path,
                                                              heldout_images, feature_net, monkeypatch):
    """KID and FID of a candidate's 8 samples against the 12 held-out images equal what `deme eval` reports when
    those images are its samples and the held-out folder its reference, with the same extractor, mode and seed (8 of
    12: KID's subsets, drawn with the recipe's seed, matter). The search and eval each compute their own reference
    features (separate run dirs, so no shared cache)."""
    from deme_cli.commands.eval import run_eval

    for metric in ("kid", "fid"):
        recipe, run = _recipe(make_recipe, ranges_dir, tmp_path / metric, heldout_images, feature_net, metric, 8,
                              mode)
        [(score, images)] = _scored(recipe, run, [[1.0, 0.5]], monkeypatch)
        ev = make_recipe(seed=5, sample={"num_images": 8}, output={"dir": str(tmp_path / metric / "eval-run")},
                         eval={"reference": str(heldout_images), "metrics": [metric], "mode": mode,
                               "feature_extractor": str(feature_net[0])})
        ev_run = RunDir(ev.out_dir)
        folder = ev_run.samples("merged")
        folder.mkdir(parents=True)
        for k, img in enumerate(images):
            Image.fromarray(img).save(folder / f"{k:06d}.png")
        (folder / "samples.json").write_text(json.dumps({"seeds": {"base": 0, "count": 8}}))
        r = run_eval(ev, ev_run, ["merged"])["results"]["merged"]
        assert r["mode"] == mode and r["kid_seed"] == 5
        assert score == pytest.approx(r["metrics"][metric], rel=1e-9, abs=1e-12)
