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


# --- the loss by timestep (merge.objective = "loss_by_t" and its variants) --------------------------------------

def _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, **merge):
    import shutil

    root = tmp_path / "run"
    if not root.exists():
        shutil.copytree(ranges_dir, root)
    recipe = make_recipe(ranges={"n": N}, merge={"search": "grid", "candidates": [0.0, 1.0], "search_num_images": 12,
                                                 "search_reference": str(heldout_images), **merge})
    return recipe, RunDir(root)


def _hand_ratios(recipe, model, theta, folder):
    """Per-bin loss ratios of `model` to `theta` by the documented rule, without deme's held-out code (the hand
    computation of the eval's loss by timestep: every image of the folder, eval.loss_bins = 10, eval.loss_seed)."""
    from test_loss_by_t import _binned, _hand_losses

    a, b = _binned(*_hand_losses(recipe, model, folder)), _binned(*_hand_losses(recipe, theta, folder))
    return [x / y for x, y in zip(a, b)]


def test_loss_by_t_objective_is_the_eval_loss_by_timestep_as_a_ratio_to_theta(make_recipe, ranges_dir, tmp_path,
                                                                            heldout_images, tiny_ddpm):
    """The search's loss_by_t scores theta exactly 1 and each candidate the mean of its per-bin loss ratios to theta,
    computed here by hand; the per-bin ratios equal what `deme eval` reports (metric "loss") for the same merge written
    to merged/ and the held-out folder as eval.reference. The guarded and weighted variants score the same ratios by
    their rules."""
    from deme_cli.commands import merge
    from deme_cli.commands.eval import run_eval

    recipe, run = _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, objective="loss_by_t")
    log = merge.run_merge(recipe, run, search=True)["search"]
    assert log["objective"] == "loss_by_t" and log["evaluations"] == 4 == len(log["candidates"])
    assert log["bins"] == [[b * 100, (b + 1) * 100] for b in range(10)] and sum(log["images_per_bin"]) == 12
    scores = {tuple(c["weights"]): c["score"] for c in log["candidates"]}
    assert scores[(0.0, 0.0)] == 1.0
    theta = models.load_base(str(tiny_ddpm)).eval()
    hand = {(1.0, 0.0): _hand_ratios(recipe, models.load_model_folder(run.final(0)).eval(), theta, heldout_images),
            (0.0, 1.0): _hand_ratios(recipe, models.load_model_folder(run.final(1)).eval(), theta, heldout_images)}
    for w, ratios in hand.items():
        assert scores[w] == pytest.approx(sum(ratios) / 10, rel=1e-5), w
        assert ratios != pytest.approx([1.0] * 10, rel=1e-4)      # the range models do differ from theta

    # the same ratios from `deme eval` of the merge written with those weights
    inputs = merge_inputs(recipe, run)
    with inputs.open():
        objective, merger, _ = search_pool.candidate_evaluator(search_setup(recipe), run, inputs,
                                                               merge_methods.MergeSpec.from_section(recipe.merge))
        from deme_cli.engine.task_vectors import new_candidate_model
        cand = new_candidate_model(inputs).eval()
        merger.load_into(cand, [0.5, 1.0])
        ratios = objective.bin_ratios(cand)
    ev = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"reference": str(heldout_images),
                                                                          "metrics": ["loss"]})})
    merge.run_merge(ev, run, weights=[0.5, 1.0], force=True)
    rec = run_eval(ev, run, ["merged"])["results"]["merged"]["loss_by_t"]
    assert ratios == pytest.approx(rec["ratio"], rel=1e-5)

    # the variants: the same per-bin ratios, scored by their rules
    tol = (max(ratios) - 1.0) / 2 if max(ratios) > 1 else 0.0
    for objective_name, extra, want in [
            ("loss_by_t_guarded", {"bin_tolerance": 1e9}, sum(ratios) / 10),
            ("loss_by_t_guarded", {"bin_tolerance": tol}, max(ratios) if max(ratios) > 1 + tol else sum(ratios) / 10),
            ("loss_by_t_weighted", {"bin_weights": [3.0] + [0.0] * 8 + [1.0]}, (3 * ratios[0] + ratios[9]) / 4)]:
        r, _ = _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, objective=objective_name, **extra)
        inputs = merge_inputs(r, run)
        with inputs.open():
            _, _, evaluate = search_pool.candidate_evaluator(search_setup(r), run, inputs,
                                                             merge_methods.MergeSpec.from_section(r.merge))
            assert evaluate([0.0, 0.0]) == 1.0
            assert evaluate([0.5, 1.0]) == pytest.approx(want, rel=1e-5), (objective_name, extra)


def test_guarded_score_ranks_a_low_noise_loss_below_theta():
    """The benchmark's warning as a rule: (0, 0, 0.5, 1) lost 0.1-0.2% at t < 500 and gained 4% at t >= 900 (mean of
    the ratios 0.9945, the best) yet had the worst FID; the guarded score ranks it below theta (1) and below a merge
    within the tolerance everywhere, which keeps its plain mean."""
    from deme_cli.engine.recipe import MergeSection
    from deme_cli.engine.search_objectives import BIN_SCORES

    strong_high_t = [1.0015, 1.002, 1.001, 1.001, 1.0005, 0.999, 0.998, 0.99, 0.97, 0.96]
    uniform = [0.9999, 0.9998, 0.9993, 0.9991, 0.9994, 0.9996, 0.9995, 0.9988, 0.9948, 0.9900]
    m = MergeSection(bin_tolerance=0.0005)
    plain, guarded = BIN_SCORES["loss_by_t"].score, BIN_SCORES["loss_by_t_guarded"].score
    assert plain(strong_high_t, m) < plain(uniform, m) < 1.0          # the plain mean prefers the bad merge
    assert guarded(strong_high_t, m) == 1.002 > 1.0 > guarded(uniform, m) == pytest.approx(sum(uniform) / 10)
    assert guarded([1.0] * 10, m) == 1.0
    assert guarded(strong_high_t, MergeSection(bin_tolerance=0.01)) == pytest.approx(sum(strong_high_t) / 10)


def test_loss_by_t_settings_are_checked_and_fingerprinted(make_recipe, ranges_dir, tmp_path, heldout_images):
    """loss_by_t_weighted without merge.bin_weights, or with the wrong number of them, is refused in one sentence
    before anything is written; the search's settings (merge.json fingerprint) hold the bins, their seed and the
    variant's own key, and only that one."""
    from deme_cli.commands import merge
    from deme_cli.engine.errors import UsageError
    from deme_cli.engine.weight_search import search_settings

    recipe, run = _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, objective="loss_by_t_weighted")
    with pytest.raises(UsageError, match="needs merge.bin_weights"):
        merge.run_merge(recipe, run, search=True)
    recipe, run = _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, objective="loss_by_t_weighted",
                               bin_weights=[1.0, 2.0])
    with pytest.raises(UsageError, match="merge.bin_weights has 2 weights but eval.loss_bins = 10"):
        merge.run_merge(recipe, run, search=True)
    assert not run.merged.exists()

    def settings(objective, **m):
        r, _ = _loss_recipe(make_recipe, ranges_dir, tmp_path, heldout_images, objective=objective, **m)
        return search_settings(search_setup(r), N, [0.5, 0.5])
    g = settings("loss_by_t_guarded", bin_tolerance=0.001)
    assert g["loss_bins"] == 10 and g["loss_seed"] == 0 and g["bin_tolerance"] == 0.001 and "bin_weights" not in g
    assert settings("loss_by_t_guarded", bin_tolerance=0.002) != g
    assert settings("loss_by_t", bin_tolerance=0.001) == settings("loss_by_t", bin_tolerance=0.002)
