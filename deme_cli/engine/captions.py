"""Image-caption training data for text-to-image DeMe: pairs, the latent cache, and the training task.

The student and the teacher are `UNet2DConditionModel`s; both see the same inputs (paper Eq. 5):

    x0 = VAE-encoder mean(image) * vae.config.scaling_factor        latents, (4, H/8, W/8) for SD v1
    c  = text_encoder(tokenizer(caption)).last_hidden_state          (77, 768) for SD v1
    unet(x_t, t, encoder_hidden_states=c)

We encode with the mean of the VAE posterior, not a sample (BK-SDM and diffusers' example sample it): the mean is
deterministic, so it can be cached, and for the SD VAE the posterior's standard deviation is small next to the
latents' spread. With probability data.caption_dropout a caption is replaced by the empty caption "" (classifier-free
guidance training; its embedding is the unconditional one the sampler uses).

Data: a Hugging Face dataset with an image column and a caption column (data.caption_column, default "text"), or a
local folder with `metadata.jsonl` lines {"file_name": ..., "text": ...} (the caption key is data.caption_column too).

Latent cache (data.cache_latents): the VAE latents and text embeddings of every training pair are computed once and
stored in float16 under `<run>/cache/<key>/` (shards of CACHE_SHARD items + cache.json, written last), where <key>
hashes the data settings, the captions and the weights of the VAE, text encoder and tokenizer. Every range of the run
(and a rerun) reuses it; an interrupted build continues from its finished shards. Cached latents use the centre crop
(a random crop cannot be cached); with data.random_flip the flipped image is encoded too, so flips stay exact. The
per-item randomness (flip, caption dropout) is a pure function of (seed, epoch, index), as in `data.py`, so the cached
and the on-the-fly paths see the same pairs.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import ui
from .data import HFImages, ImageDataset, ImageFiles, augment_rng
from .errors import UsageError
from .runs import read_json, read_jsonl, write_json
from .text2image import FrozenEncoders

METADATA = "metadata.jsonl"
CACHE_SHARD = 512           # items per cache shard (SD v1 at 512 px: ~150 MB of float16 per shard)
CACHE_FORMAT = 1            # bump when the cache layout changes
_DROPOUT_STREAM = 0xC0D     # seed-sequence tag of the caption-dropout stream (apart from crop/flip and order)


# --- image-caption sources: each returns (load(i) -> PIL image, picklable, with len(); captions) ------------------

def _caption(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):  # some datasets hold several captions per image: take the first
        value = value[0] if value else ""
    if not isinstance(value, str):
        raise UsageError(f"{where} is not text ({type(value).__name__}); point data.caption_column at a text column")
    return value


class MetadataFolder(ImageFiles):
    """The images listed in data.path/metadata.jsonl, in file order (loader: len() and loader(i) -> PIL image)."""

    def __init__(self, files: list[Path]):
        self.files = files


def _folder_pairs(data) -> tuple[Any, list[str]]:
    """data.path/metadata.jsonl: one JSON object per line with "file_name" and the caption key."""
    root = Path(data.path).expanduser()
    if not root.is_dir():
        raise UsageError(f"data.path '{data.path}' is not a folder; point it at a folder of images with a {METADATA}")
    meta = root / METADATA
    if not meta.is_file():
        raise UsageError(f"'{root}' has no {METADATA}; text-to-image training needs one line per image like "
                         f'{{"file_name": "0001.png", "text": "a caption"}}')
    key = data.caption_column
    files, captions = [], []
    def lacking(n: int, have: str) -> str:
        return (f'{meta} line {n} needs the keys "file_name" and "{key}" (it has: {have}); fix it or set '
                f'data.caption_column')

    for n, rec in read_jsonl(meta, ("file_name", key), lacking):
        f = root / str(rec["file_name"])
        if not f.is_file():
            raise UsageError(f"{meta} line {n} names '{rec['file_name']}', which is not in '{root}'; fix the line "
                             f"or add the image")
        files.append(f)
        captions.append(_caption(rec[key], f"{meta} line {n}: \"{key}\""))
    if not files:
        raise UsageError(f"{meta} lists no images; add one line per image")
    return MetadataFolder(files), captions


def _hf_pairs(data) -> tuple[Any, list[str]]:
    """Columns data.image_column and data.caption_column of datasets.load_dataset(data.name, split=data.split)."""
    images = HFImages(data)
    key = data.caption_column
    if key not in images.ds.column_names:
        raise UsageError(f"dataset '{data.name}' has no column '{key}' (columns: {', '.join(images.ds.column_names)}); "
                         f"set data.caption_column")
    return images, [_caption(c, f"dataset '{data.name}' column '{key}'") for c in images.ds[key]]


PAIR_SOURCES: dict[str, Callable[[Any], tuple[Any, list[str]]]] = {
    "imagefolder": _folder_pairs,
    "hf": _hf_pairs,
}


def image_caption_pairs(data) -> tuple[int, Callable[[int], Any], list[str]]:
    """The recipe's training pairs: (count, load(i) -> PIL image, captions), data.max_samples applied."""
    load, captions = PAIR_SOURCES[data.source](data)
    n = len(captions) if data.max_samples is None else min(len(captions), data.max_samples)
    return n, load, captions[:n]


def dropout_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator behind one item's caption dropout: a pure function of (seed, epoch, index)."""
    return np.random.default_rng([_DROPOUT_STREAM, seed, epoch, index])


def _key(key) -> tuple[int, int]:
    return (int(key), 0) if isinstance(key, (int, np.integer)) else (int(key[0]), int(key[1]))


# --- datasets ------------------------------------------------------------------------------------------------------

class CaptionedImages(ImageDataset):
    """On-the-fly pairs: {"pixels": (3, H, W) in [-1, 1], "caption": str ("" when dropped)}."""

    def __init__(self, load, n: int, captions: list[str], caption_dropout: float, **kw):
        super().__init__(load, n, **kw)
        self.captions, self.caption_dropout = captions, caption_dropout

    def __getitem__(self, key):
        index, epoch = _key(key)
        pixels = super().__getitem__((index, epoch))
        drop = self.caption_dropout > 0 and dropout_rng(self.seed, epoch, index).random() < self.caption_dropout
        return {"pixels": pixels, "caption": "" if drop else self.captions[index]}


class CachedPairs:
    """Pairs from the latent cache: {"latents": (4, h, w), "text_embeds": (L, D)}, float32."""

    def __init__(self, cache_dir: Path, info: dict, seed: int, random_flip: bool, caption_dropout: float):
        from safetensors.torch import load_file

        self.dir, self.info, self.seed = Path(cache_dir), info, seed
        self.random_flip, self.caption_dropout = random_flip, caption_dropout
        self.empty = load_file(str(self.dir / "empty.safetensors"))["text_embeds"][0].float()
        self._open: dict = {}

    def __getstate__(self):  # DataLoader workers open their own file handles
        return {**self.__dict__, "_open": {}}

    def __len__(self) -> int:
        return self.info["items"]

    def _read(self, name: str, index: int):
        from safetensors import safe_open

        s, j = divmod(index, self.info["shard_size"])
        if s not in self._open:
            self._open[s] = safe_open(str(self.dir / shard_name(s)), framework="pt")
        return self._open[s].get_slice(name)[j:j + 1][0].float()

    def __getitem__(self, key):
        index, epoch = _key(key)
        if not 0 <= index < len(self):
            raise IndexError(index)
        # the same draws, in the same order, as data.to_tensor with a centre crop: the on-the-fly path agrees
        flip = self.random_flip and augment_rng(self.seed, epoch, index).random() < 0.5
        drop = self.caption_dropout > 0 and dropout_rng(self.seed, epoch, index).random() < self.caption_dropout
        return {"latents": self._read("latents_flip" if flip else "latents", index),
                "text_embeds": self.empty.clone() if drop else self._read("text_embeds", index)}


# --- the latent cache ----------------------------------------------------------------------------------------------

def shard_name(s: int) -> str:
    return f"shard-{s:05d}.safetensors"


def cache_key(data, captions: list[str], encoders_id: str) -> str:
    """What the cached tensors depend on: data settings, the captions, the encoders, the cache format."""
    settings = {k: getattr(data, k) for k in ("source", "path", "name", "split", "image_column", "caption_column",
                                              "resolution", "random_flip", "max_samples")}
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "data": settings, "encoders": encoders_id},
                                  sort_keys=True, default=str).encode())
    for c in captions:
        h.update(c.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def build_cache(cache_dir: Path, encoders: FrozenEncoders, n: int, load: Callable, captions: list[str],
                resolution: int, random_flip: bool, batch_size: int, rank: int = 0, world: int = 1) -> dict:
    """Encode every pair once into float16 shards under cache_dir; returns the cache info (cache.json).

    Shards already on disk are kept (an interrupted build continues). With several processes, process r builds
    shards r, r + world, ...; the caller waits for all before reading (the main process then writes cache.json).
    """
    import torch
    from safetensors.torch import save_file

    from .data import to_tensor

    cache_dir.mkdir(parents=True, exist_ok=True)
    shards = (n + CACHE_SHARD - 1) // CACHE_SHARD
    todo = [s for s in range(rank, shards, world) if not (cache_dir / shard_name(s)).is_file()]
    with ui.progress(f"caching latents ({n} pairs)", total=len(todo), unit="shard", every=1) as bar:
        for s in todo:
            idx = list(range(s * CACHE_SHARD, min(n, (s + 1) * CACHE_SHARD)))
            out: dict[str, list] = {"latents": [], "text_embeds": []}
            if random_flip:
                out["latents_flip"] = []
            for b in range(0, len(idx), batch_size):
                part = idx[b:b + batch_size]
                pixels = torch.stack([to_tensor(load(i), resolution, encoders.pixel_channels, center_crop=True,
                                                random_flip=False, rng=None) for i in part])
                out["latents"].append(encoders.encode_images(pixels).half().cpu())
                if random_flip:
                    out["latents_flip"].append(encoders.encode_images(pixels.flip(-1)).half().cpu())
                out["text_embeds"].append(encoders.encode_text([captions[i] for i in part]).half().cpu())
            tmp = cache_dir / f".{shard_name(s)}.{rank}.tmp"
            save_file({k: torch.cat(v).contiguous() for k, v in out.items()}, str(tmp))
            tmp.replace(cache_dir / shard_name(s))
            bar.update(1)
    if rank == 0:
        save_file({"text_embeds": encoders.encode_text([""]).half().cpu().contiguous()},
                  str(cache_dir / "empty.safetensors"))
    return {"format": CACHE_FORMAT, "items": n, "shards": shards, "shard_size": CACHE_SHARD,
            "resolution": resolution, "random_flip": random_flip, "dtype": "float16"}


# --- the training task ---------------------------------------------------------------------------------------------

class TextToImageTask:
    """Stable Diffusion: a batch is image-caption pairs; x0 = VAE latents, the UNet also takes the text embeddings.

    Plugs into trainer.RangeTrainer: `dataset()` and `prepare(batch) -> (x0, {"encoder_hidden_states": c})`.
    """

    name = "text_to_image"

    def __init__(self, base, unet, data, *, seed: int, device, cache_dir: Optional[Path] = None,
                 batch_size: int = 16):
        """`cache_dir`: where latents are cached (data.cache_latents); `batch_size`: images per encoder call."""
        self.data, self.seed, self.device, self.batch_size = data, seed, device, batch_size
        self.encoders = FrozenEncoders(base.folder, device)
        self.encoders.check_unet(unet.config)
        down = 2 ** (len(unet.config.block_out_channels) - 1)
        if data.resolution % (self.encoders.scale * down):
            raise UsageError(f"data.resolution = {data.resolution} must be a multiple of {self.encoders.scale * down} "
                             f"for this pipeline (VAE x{self.encoders.scale}, UNet x{down} downsampling)")
        self.n, self.load, self.captions = image_caption_pairs(data)
        self.cache_dir = self.cache_info = None
        if data.cache_latents:
            if cache_dir is None:
                raise ValueError("data.cache_latents needs a cache folder")
            self.cache_dir, self.cache_info = self._cache(cache_dir)
            self.encoders = None  # the frozen encoders are no longer needed: free their memory
            if getattr(device, "type", str(device)) == "cuda":
                import torch

                torch.cuda.empty_cache()

    def _cache(self, root: Path) -> tuple[Path, dict]:
        from accelerate import PartialState

        data, state = self.data, PartialState()
        if not data.center_crop and state.is_main_process:
            ui.warn("cached latents use the centre crop; set data.cache_latents = false to train on random crops")
        key = cache_key(data, self.captions, self.encoders.identity())
        folder = root / key
        if (folder / "cache.json").is_file():
            return folder, read_json(folder / "cache.json")
        info = build_cache(folder, self.encoders, self.n, self.load, self.captions, data.resolution, data.random_flip,
                           self.batch_size, state.process_index, state.num_processes)
        state.wait_for_everyone()
        if state.is_main_process:
            write_json(folder / "cache.json", {**info, "key": key})
        state.wait_for_everyone()
        return folder, info

    def dataset(self):
        data, seed = self.data, self.seed
        if self.cache_dir is not None:
            return CachedPairs(self.cache_dir, self.cache_info, seed, data.random_flip, data.caption_dropout)
        return CaptionedImages(self.load, self.n, self.captions, data.caption_dropout, resolution=data.resolution,
                               channels=self.encoders.pixel_channels, center_crop=data.center_crop,
                               random_flip=data.random_flip, seed=seed)

    def prepare(self, batch) -> tuple[Any, dict]:
        """batch -> (latents x0 on the device, {"encoder_hidden_states": text embeddings}) for student and teacher."""
        if "latents" in batch:
            x0, c = batch["latents"], batch["text_embeds"]
        else:
            x0, c = self.encoders.encode_images(batch["pixels"]), self.encoders.encode_text(batch["caption"])
        return (x0.to(self.device, non_blocking=True),
                {"encoder_hidden_states": c.to(self.device, non_blocking=True)})
