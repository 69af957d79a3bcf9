"""Stable Diffusion data and training task on the tiny SD pipeline: pairs, bad input, the latent cache."""
from __future__ import annotations

import json
import shutil

import pytest

from deme_cli.engine.errors import UsageError


@pytest.fixture
def sd_recipe(tmp_path, tiny_sd):
    from deme_cli.engine.recipe import recipe_from_dict

    def make(data=None, **sections):
        base = {
            "name": "tiny-sd", "seed": 0,
            "model": {"pretrained": str(tiny_sd["pipeline"])},
            "data": {"source": "imagefolder", "path": str(tiny_sd["images"]), "resolution": 16,
                     "center_crop": True, **(data or {})},
            "ranges": {"n": 2},
            "train": {"steps": 2, "batch_size": 4, "mixed_precision": "no", "checkpoint_every": 2},
            "output": {"dir": str(tmp_path / "run")},
            **sections,
        }
        return recipe_from_dict(base)
    return make


def _task(recipe, tiny_sd):
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.runs import RunDir

    base = resolve_base(recipe.model, "cpu")
    assert base.kind.name == "text-to-image"
    return base.kind.task(base, base.load_unet(), recipe.data, seed=recipe.seed, device="cpu",
                          cache_dir=RunDir(recipe.out_dir).cache, batch_size=recipe.train.batch_size)


def test_folder_pairs_read_metadata_captions(sd_recipe, tiny_sd):
    from deme_cli.engine.captions import image_caption_pairs

    n, load, captions = image_caption_pairs(sd_recipe().data)
    assert n == 16 and captions[:4] == ["the cat", "the dog", "a cat", "a dog"]
    assert load(0).size == (16, 16)
    n, _, captions = image_caption_pairs(sd_recipe(data={"max_samples": 5}).data)
    assert n == 5 and len(captions) == 5


@pytest.mark.parametrize("metadata, words", [
    (None, "metadata.jsonl"),
    ('{"file_name": "0000.png", "caption": "x"}\n', '"text"'),
    ('{"file_name": "0000.png", "text": "x"\n', "not valid JSON"),
    ('{"file_name": "nope.png", "text": "x"}\n', "nope.png"),
])
def test_folder_metadata_problems_are_usage_errors(tmp_path, sd_recipe, tiny_sd, metadata, words):
    from deme_cli.engine.captions import image_caption_pairs

    folder = tmp_path / "imgs"
    shutil.copytree(tiny_sd["images"], folder)
    (folder / "metadata.jsonl").unlink()
    if metadata is not None:
        (folder / "metadata.jsonl").write_text(metadata)
    with pytest.raises(UsageError, match=words):
        image_caption_pairs(sd_recipe(data={"path": str(folder)}).data)


def test_hf_dataset_missing_caption_column_names_the_columns(tmp_path, sd_recipe, tiny_sd):
    import datasets
    from PIL import Image

    from deme_cli.engine.captions import image_caption_pairs

    imgs = [Image.open(tiny_sd["images"] / f"{k:04d}.png").convert("RGB") for k in range(4)]
    path = tmp_path / "ds"
    datasets.Dataset.from_dict({"image": imgs, "caption": ["a cat"] * 4}).save_to_disk(str(path))
    ok = sd_recipe(data={"source": "hf", "name": str(path), "caption_column": "caption"})
    n, load, captions = image_caption_pairs(ok.data)
    assert n == 4 and captions == ["a cat"] * 4 and load(2).size == (16, 16)
    bad = sd_recipe(data={"source": "hf", "name": str(path), "caption_column": "text"})
    with pytest.raises(UsageError, match=r"no column 'text' \(columns: image, caption\)"):
        image_caption_pairs(bad.data)


def test_pipeline_without_text_encoder_is_a_usage_error(tmp_path, tiny_sd):
    from deme_cli.engine.text2image import FrozenEncoders

    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_sd["pipeline"], pipe)
    shutil.rmtree(pipe / "text_encoder")
    with pytest.raises(UsageError, match="has no text_encoder/"):
        FrozenEncoders(pipe)


def test_encoders_scale_latents_and_round_trip_shapes(tiny_sd):
    import torch

    from deme_cli.engine.text2image import FrozenEncoders

    enc = FrozenEncoders(tiny_sd["pipeline"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = enc.encode_images(x)
    mean = enc.vae.encode(x).latent_dist.mean
    assert z.shape == (2, 4, 8, 8) and torch.allclose(z, mean * enc.vae.config.scaling_factor)
    assert enc.decode(z).shape == (2, 3, 16, 16)
    c = enc.encode_text(["the cat", ""])
    assert c.shape == (2, 16, 32) and not torch.allclose(c[0], c[1])


def test_cache_matches_on_the_fly_pairs_and_is_reused(sd_recipe, tiny_sd, monkeypatch):
    """Cached latents and embeddings equal the on-the-fly ones (float16 rounding), flips and dropouts included."""
    import torch

    from deme_cli.engine import captions

    data = {"random_flip": True, "caption_dropout": 0.5}
    cached = _task(sd_recipe(data={**data, "cache_latents": True}), tiny_sd)
    live = _task(sd_recipe(data={**data, "cache_latents": False}), tiny_sd)
    assert cached.encoders is None and len(list(cached.cache_dir.glob("shard-*.safetensors"))) == 1
    dc, dl = cached.dataset(), live.dataset()
    assert len(dc) == len(dl) == 16
    keys = [(i, e) for e in range(3) for i in range(16)]
    xc, cc = cached.prepare(torch.utils.data.default_collate([dc[k] for k in keys]))
    xl, cl = live.prepare(torch.utils.data.default_collate([dl[k] for k in keys]))
    assert xc.shape == (48, 4, 8, 8) and cc["encoder_hidden_states"].shape == (48, 16, 32)
    torch.testing.assert_close(xc, xl, atol=2e-3 * xl.abs().max().item(), rtol=0)
    torch.testing.assert_close(cc["encoder_hidden_states"], cl["encoder_hidden_states"], atol=1e-2, rtol=0)
    empty = live.encoders.encode_text([""])[0]
    dropped = [torch.allclose(e, empty, atol=1e-2) for e in cl["encoder_hidden_states"]]
    assert 10 < sum(dropped) < 38                            # caption dropout 0.5 of 48 items
    flipped = [not torch.allclose(a, b, atol=1e-3) for a, b in zip(xc[:16], xc[16:32])]
    assert any(flipped)                                     # epochs draw different flips of the same image

    # a second range (a new task) reuses the cache instead of encoding again
    monkeypatch.setattr(captions, "build_cache", lambda *a, **k: pytest.fail("cache rebuilt"))
    again = _task(sd_recipe(data={**data, "cache_latents": True}), tiny_sd)
    assert again.cache_dir == cached.cache_dir
    # other data settings make another cache
    other = captions.cache_key(sd_recipe(data={"resolution": 32}).data, cached.captions, "x")
    assert other != captions.cache_key(sd_recipe().data, cached.captions, "x")
    info = json.loads((cached.cache_dir / "cache.json").read_text())
    assert info["items"] == 16 and info["random_flip"] is True


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampling_matches_the_diffusers_pipeline(tiny_sd, guidance):
    """Our loop + TextToImageDenoiser gives the images of diffusers' StableDiffusionPipeline (same seeds, DDIM)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from deme_cli.engine.models import load_base, scheduler_config
    from deme_cli.engine.denoise import UNetDenoiser, generate
    from deme_cli.engine.text2image import FrozenEncoders, TextToImageDenoiser

    pipe_dir = tiny_sd["pipeline"]
    prompts, seeds = ["the cat", "a dog", "the dog"], [5, 6, 7]
    den = TextToImageDenoiser(UNetDenoiser(load_base(str(pipe_dir)).eval()), FrozenEncoders(pipe_dir), guidance,
                              negative_prompt="a cat")
    ours = generate(den, "ddim", 4, seeds, scheduler_config=scheduler_config(pipe_dir), conds=prompts,
                    batch_size=2)
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(prompts, negative_prompt=["a cat"] * 3, num_inference_steps=4, guidance_scale=guidance,
               generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="np").images
    ref = (ref * 255).round().astype(np.uint8)
    assert ours.shape == ref.shape == (3, 16, 16, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_guidance_pushes_away_from_the_negative_prompt(tiny_sd):
    """eps = eps_neg + g (eps_c - eps_neg): g = 1 is the conditional model, g = 0 the negative prompt's."""
    import torch

    from deme_cli.engine.models import load_base
    from deme_cli.engine.denoise import UNetDenoiser
    from deme_cli.engine.text2image import FrozenEncoders, TextToImageDenoiser

    inner, enc = UNetDenoiser(load_base(str(tiny_sd["pipeline"])).eval()), FrozenEncoders(tiny_sd["pipeline"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(500)
    with torch.no_grad():
        cond = inner(x, t, {"encoder_hidden_states": enc.encode_text(["the cat", "a dog"])})
        neg = inner(x, t, {"encoder_hidden_states": enc.encode_text(["a cat", "a cat"])})
        for g, want in ((3.0, neg + 3.0 * (cond - neg)), (1.0, cond)):
            d = TextToImageDenoiser(inner, enc, g, "a cat")
            torch.testing.assert_close(d(x, t, d.condition(["the cat", "a dog"])), want, atol=1e-5, rtol=1e-5)
