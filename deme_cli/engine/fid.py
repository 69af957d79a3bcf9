"""FID and KID: the reference (`eval.reference`) and the distances between its features and a model's.

FID is `frechet_distance` (clean-fid's formula, our code) between the Gaussian fits of the two feature sets; KID is
clean-fid's `kernel_distance` (its unbiased estimate over random subsets, drawn the same way in `kid_subsets`). The
features come from features.py (clean-fid's resize and a feature extractor).

References (`eval.reference`): an image folder, a `.npz` of statistics (`mu`, `sigma`, and optionally `feats` for
KID; clean-fid's and pytorch-fid's stats files have this form), or a clean-fid dataset name (online only).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import UsageError
from .features import FeatureExtractor, array_features, files_features, image_files, load_extractor


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
