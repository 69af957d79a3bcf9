"""Shared fixtures: tiny models and images built offline from configs (random weights), once per session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op thread for the whole suite: the models are tiny, and on a shared 2-core machine two spinning
    OpenMP threads made them 10-70x slower. Tests that start processes set OMP_NUM_THREADS themselves."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8)


def write_shapes(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """n RGB PNGs of coloured rectangles on black with a little noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        x0, y0 = rng.integers(0, size // 2, 2)
        w, h = rng.integers(size // 4, size // 2, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(60, 255, 3)
        img += rng.integers(0, 20, img.shape, dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{k:04d}.png")
    return folder


def hand_alphas_cumprod(T: int = 1000) -> np.ndarray:
    """The tiny pipelines' DDPM schedule by hand (Ho et al. 2020: beta linear from 1e-4 to 0.02), float64:
    abar_t = prod_{s <= t} (1 - beta_s). Tests build x_t from it instead of asking the scheduler under test."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, T, dtype=np.float64))


def read_pngs(folder: Path) -> np.ndarray:
    """The numbered PNGs of a sample folder, in index order, as one float64 array (n, H, W, 3) of 0..255."""
    from PIL import Image

    from deme_cli.engine.images import existing_images

    files = existing_images(folder)
    return np.stack([np.asarray(Image.open(files[k]).convert("RGB")) for k in sorted(files)]).astype(np.float64)


def held_bytes(merger) -> int:
    """The bytes of every tensor a task_vectors.CandidateMerger holds: theta and the task vectors."""
    return sum(t.numel() * t.element_size() for _, _, theta, taus in merger.entries
               for t in [theta] + [tau for _, tau in taus])


def build_ddpm(folder: Path, **overrides) -> Path:
    """Save a tiny DDPM pipeline (UNet2DModel + DDPMScheduler, T = 1000) with random weights."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**{**TINY_UNET, **overrides})
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_ddpm(tmp_path_factory) -> Path:
    return build_ddpm(tmp_path_factory.mktemp("ddpm") / "pipe")


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("images") / "train", 32, 16)


@pytest.fixture(scope="session")
def heldout_images(tmp_path_factory) -> Path:
    """Images of the same kind as tiny_images, not trained on: for weight searches and held-out losses."""
    return write_shapes(tmp_path_factory.mktemp("heldout") / "heldout", 12, 16, seed=7)


def tiny_recipe_dict(tiny_ddpm: Path, tiny_images: Path, out: Path) -> dict:
    """The recipe (as a dict) of the tiny DDPM on the tiny images, run dir `out`: what make_recipe starts from."""
    return {
        "name": "tiny", "seed": 0,
        "model": {"pretrained": str(tiny_ddpm)},
        "data": {"source": "imagefolder", "path": str(tiny_images), "resolution": 16},
        "ranges": {"n": 2},
        "train": {"steps": 4, "batch_size": 4, "lr": 1e-4, "mixed_precision": "no", "checkpoint_every": 2},
        "deme": {"p": 0.3, "consistency_weight": 1.0, "projection": True},
        "output": {"dir": str(out)},
    }


@pytest.fixture
def make_recipe(tmp_path, tiny_ddpm, tiny_images):
    """make_recipe(**sections) -> a validated Recipe for the tiny DDPM; sections override the defaults below."""
    from deme_cli.engine.recipe import recipe_from_dict

    def make(**sections):
        base = tiny_recipe_dict(tiny_ddpm, tiny_images, tmp_path / "run")
        for k, v in sections.items():
            base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return recipe_from_dict(base)

    return make


# --- a tiny Stable-Diffusion-like pipeline ----------------------------------------------------------------------

SD_WORDS = ["the cat", "the dog", "a cat", "a dog"]


def _bytes_to_unicode() -> list[str]:
    """The 256 byte-level characters of CLIP's BPE, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer(folder: Path) -> dict:
    """A local CLIP BPE tokenizer (vocab.json + merges.txt) knowing 'the', 'cat', 'dog'; returns the vocab.

    transformers 5.x: load it with CLIPTokenizer.from_pretrained(folder) (ecosystem.md section E).
    """
    import json

    alphabet = _bytes_to_unicode()
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges] + ["<|startoftext|>",
                                                                                         "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab


def build_tiny_sd(root: Path) -> dict:
    """Save a tiny SD-like pipeline, a captioned image folder, prompts.txt and a tiny CLIP under `root`.

    Returns {"pipeline", "images", "prompts", "clip"} paths. The UNet works on 8x8 latents (16x16 images: the VAE
    downsamples by 2); the text encoder and CLIP have width 32 and 16 token positions.
    """
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = write_tokenizer(root / "tok")
    tok = CLIPTokenizer.from_pretrained(root / "tok", model_max_length=16)
    tcfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"], projection_dim=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**tcfg)), tokenizer=tok, unet=unet,
                            scheduler=sched, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd")
    images = write_shapes(root / "sd-images", 16, 16, seed=1)
    with open(images / "metadata.jsonl", "w") as f:
        for k in range(16):
            f.write(json.dumps({"file_name": f"{k:04d}.png", "text": SD_WORDS[k % 4]}) + "\n")
    (root / "prompts.txt").write_text("\n".join(SD_WORDS) + "\n")
    clip = CLIPModel(CLIPConfig(text_config=tcfg, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4,
        projection_dim=32), projection_dim=32))
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    try:  # the image processor needs torchvision in some transformers versions; CLIP score can do without it
        from transformers import CLIPImageProcessor

        CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
            root / "clip")
    except Exception:
        pass
    return {"pipeline": root / "sd", "images": images, "prompts": root / "prompts.txt", "clip": root / "clip"}


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> dict:
    """Paths of a tiny SD-like pipeline, 16 captioned 16x16 images, prompts.txt and a tiny CLIP (see build_tiny_sd)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd"))


def trainer_for(recipe, rng):
    """The RangeTrainer `deme train` builds for range `rng` of a recipe (base resolved as the command resolves it)."""
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.runs import RunDir
    from deme_cli.engine.trainer import RangeTrainer

    base = resolve_base(recipe.model, recipe.train.device, recipe.train.mixed_precision)
    return RangeTrainer(base, rng, data=recipe.data, train=recipe.train, deme=recipe.deme, seed=recipe.seed,
                        cache_dir=RunDir(recipe.out_dir).cache)


def merge_inputs(recipe, run):
    """The merge inputs `deme merge` loads for a recipe: its N range models and theta."""
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.task_vectors import load_inputs

    return load_inputs(resolve_base(recipe.model, recipe.train.device), run, n=recipe.ranges.n,
                       use_ema=recipe.merge.use_ema)


def search_setup(recipe):
    """What the weight search reads from a recipe (as `deme merge` builds it)."""
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.recipe import stage_kwargs
    from deme_cli.engine.search_objectives import SearchSetup

    base = resolve_base(recipe.model, recipe.train.device)
    return SearchSetup.from_sections(base, **stage_kwargs(SearchSetup.from_sections, recipe))
