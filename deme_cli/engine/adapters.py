"""LoRA range models (`deme.adapter = "lora"`): each range model is the frozen base UNet plus low-rank adapters.

A range model trains LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685, through `peft`, the library
diffusers itself uses) on the UNet's target layers, and its channel-wise projections in full (they are small). For an
adapted layer with base weight W (out x in, or out x in x k x k for a convolution), peft adds

    delta W = scale * B @ A,        scale = lora_alpha / lora_rank,

with A (rank x in[ x k x k]) and B (out x rank[ x 1 x 1]); B starts at zero, so the range model starts as the base.
That delta is the range's task vector on W (tau_i = theta_i - theta of Eq. 8); every other UNet tensor has tau_i = 0.
`deme merge` merges those deltas by any method into a full UNet (task_vectors.py), and a range model is sampled as
the base with its deltas added (`load_lora_model`).

A LoRA range folder (`ranges/<i>/final/`, `final-raw/`) is a pipeline folder (pipeline_folders.py) whose unet/ is a
DemeUNet: unet/base/ (hard links to the base UNet's files), unet/model-0/lora.safetensors (<module>.lora_A.weight,
<module>.lora_B.weight) and, with projections, unet/model-0/projection.safetensors; so
`DiffusionPipeline.from_pretrained(final, trust_remote_code=True)` gives the range model. Stable Diffusion range
models also hold pytorch_lora_weights.safetensors, diffusers' own LoRA file (`pipe.load_lora_weights(final)` on the
base pipeline; with projections that is not the whole range model). deme.json's "adapter" says kind, rank, alpha,
scale, target modules, and "base_model" names the base's folder. Folders of the older layout hold lora/ (peft's
adapter_model.safetensors, base_model.model.<module>.lora_A.weight, ...) and projection.safetensors instead; deme
reads them too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError

ADAPTERS = ("full", "lora")
ADAPTER_NAME = "default"
# Target modules when deme.lora_targets is unset, by UNet class. Stable Diffusion: the attention projections, as
# diffusers' LoRA training scripts do. Pixel UNets (DDPM): those, and the ResNet blocks' two 3x3 convolutions, which
# hold most of the weights (the CIFAR10 and Fashion-MNIST UNets have attention at one resolution only, or none).
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TARGETS = {"UNet2DConditionModel": ATTENTION, "UNet2DModel": ATTENTION + ["conv1", "conv2"]}


def is_lora(deme) -> bool:
    return deme.adapter == "lora"


def matches(name: str, target: str) -> bool:
    """peft's rule for a target given by name: the module's full name, or its last dotted parts."""
    return name == target or name.endswith("." + target)


def target_modules(unet, targets: Optional[list[str]] = None) -> list[str]:
    """The target module names (deme.lora_targets, or the default for the UNet's class), each checked to match at
    least one Linear or Conv2d layer of `unet`."""
    from torch import nn

    cls = type(unet).__name__
    names = list(targets) if targets else DEFAULT_TARGETS.get(cls, ATTENTION)
    layers = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    hits = {t: [n for n in layers if matches(n, t)] for t in names}
    missing = [t for t, found in hits.items() if not found]
    if not any(hits.values()):
        raise UsageError(f"deme.lora_targets {names} match no Linear or Conv2d layer of this {cls}; name layers "
                         f"such as {', '.join(sorted({n.rsplit('.', 1)[-1] for n in layers})[:8])}")
    if missing and targets:
        raise UsageError(f"deme.lora_targets: '{missing[0]}' matches no Linear or Conv2d layer of this {cls}")
    return [t for t in names if hits[t]]


def check_targets(unet_dir: Path, deme) -> None:
    """deme.lora_targets (or the default) match layers of the UNet in `unet_dir`, checked on a UNet built from its
    config on the meta device (no weights loaded): before a run writes anything."""
    if not is_lora(deme):
        return
    from .models import empty_unet

    target_modules(empty_unet(unet_dir), deme.lora_targets)


def lora_config(unet, deme):
    """peft's LoraConfig for `deme` ([deme] section: lora_rank, lora_alpha, lora_targets) on `unet`."""
    from peft import LoraConfig

    return LoraConfig(r=deme.lora_rank, lora_alpha=deme.lora_alpha_value, init_lora_weights=True,
                      target_modules=target_modules(unet, deme.lora_targets))


def add_lora(unet, deme, seed: int):
    """Freeze `unet` and inject LoRA adapters into its target layers (in place); A is drawn from a generator seeded by
    `seed` (the global RNG is left as it was), B is zero. Returns the LoraConfig."""
    import torch
    from peft import inject_adapter_in_model

    config = lora_config(unet, deme)
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER_NAME)
    return config


def meta(config) -> dict:
    """What deme.json records of a LoRA range model's adapter."""
    return {"kind": "lora", "rank": config.r, "alpha": config.lora_alpha, "scale": config.lora_alpha / config.r,
            "target_modules": sorted(config.target_modules)}


# --- folders -----------------------------------------------------------------------------------------------------

def lora_modules(shapes: dict) -> dict[str, tuple]:
    """{UNet module: (A key, B key)} of an adapter's tensor names (`shapes`: name -> shape; peft's keys with or without
    the "base_model.model." prefix, or a DemeUNet's), checked complete (deme_unet.lora_keys)."""
    from .deme_unet import lora_keys

    try:
        return lora_keys(list(shapes))
    except ValueError as e:
        raise UsageError(f"{e}; retrain the range") from None


def delta_shape(a_shape: tuple, b_shape: tuple) -> tuple:
    """The shape of B @ A's weight delta: (out, in) for a Linear, (out, in, k, k) for a Conv2d."""
    from .deme_unet import delta_shape as shape

    return shape(a_shape, b_shape)


def delta(a, b, scale: float):
    """scale * B @ A as a tensor shaped like the adapted weight, in float64 (deme_unet.lora_delta: the code that
    ships, so that a range model computes the same weights in deme and in a DemeUNet)."""
    from .deme_unet import lora_delta

    return lora_delta(a, b, scale)


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """(deme.json's "adapter", {tensor name: tensor}) of a LoRA range folder (either layout)."""
    from safetensors.torch import load_file

    from .models import read_meta
    from .pipeline_folders import folder_files

    m = read_meta(folder)
    try:
        return m["adapter"], load_file(str(folder_files(folder).lora))
    except Exception as e:  # OSError, a missing key, or safetensors' own error type on a damaged file
        raise UsageError(f"could not read the LoRA adapter in '{folder}' ({type(e).__name__}); retrain the range "
                         f"with --force") from None


def apply_deltas(unet, adapter: dict, tensors: dict) -> None:
    """Add scale * B @ A to each adapted weight of a plain (un-injected) UNet, in place (deme_unet.with_delta)."""
    import torch

    from .deme_unet import with_delta

    params = dict(unet.named_parameters())
    scale = float(adapter["scale"])
    with torch.no_grad():
        for mod, (ka, kb) in lora_modules({k: tuple(v.shape) for k, v in tensors.items()}).items():
            w = params.get(mod + ".weight")
            d = delta(tensors[ka], tensors[kb], scale)
            if w is None or tuple(w.shape) != tuple(d.shape):
                raise UsageError(f"the adapter's layer '{mod}' does not fit the base UNet; the range was trained from "
                                 f"another base: retrain it")
            w.copy_(with_delta(w, d))


def base_for(folder: Path, base_folder: Optional[Path] = None):
    """The base UNet of LoRA range model `folder` (`base_folder`, default deme.json's "base_model"), checked to be
    the one it was trained from (deme.json's base_hash)."""
    from .models import load_unet, read_meta, unet_hash

    m = read_meta(folder)
    src = Path(base_folder) if base_folder is not None else Path(m.get("base_model", ""))
    if not str(src) or not src.exists():
        raise UsageError(f"the LoRA range model '{folder}' needs its base model, '{src}', which is not there; point "
                         f"model.pretrained at it")
    unet = load_unet(src)
    if m.get("base_hash") and unet_hash(unet) != m["base_hash"]:
        raise UsageError(f"the LoRA range model '{folder}' was trained from another base model than '{src}' "
                         f"(base_hash {m['base_hash']}); point model.pretrained at its base or retrain it")
    return unet


def read_projections(folder: Path, like) -> Optional[Any]:
    """The projections of a one-model folder (either layout) as a module on `like`'s device and dtype, or None."""
    from .models import load_tensors, make_projections
    from .pipeline_folders import folder_files

    f = folder_files(folder).projection
    if f is None:
        return None
    proj = make_projections(like)
    proj.load_state_dict(load_tensors(f, device=str(like.device)))
    return proj


def load_lora_model(folder: Path, base_folder: Optional[Path] = None, dtype=None):
    """A LoRA range folder as a full DemeModel: the base UNet (`base_folder`, default deme.json's "base_model") with
    the adapter's deltas added, and the projections. The base must be the one the range was trained from."""
    from .models import DemeModel

    folder = Path(folder)
    unet = base_for(folder, base_folder)
    adapter, tensors = read_adapter(folder)
    apply_deltas(unet, adapter, tensors)
    if dtype is not None:
        unet = unet.to(dtype)
    return DemeModel(unet, read_projections(folder, unet))


def save_lora_folder(folder: Path, model, meta: dict, state: dict, base_folder: Optional[Path] = None) -> None:
    """Write a LoRA range folder atomically (models.save_model_folder's contract): `state` holds exactly the student's
    trained tensors (unet.*lora_A/B*, projections.*); meta must say "adapter" and "base_model" (the base pipeline
    folder, whose UNet unet/base/ links to and whose other parts the pipeline folder gets)."""
    import shutil

    from . import pipeline_folders as pf
    from .models import EXPORT_FORMAT, META_FILE, split_state, swap_in, unet_folder

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lora_sd, proj_sd = split_state(state)
    expected = {n[len("unet."):] for n, p in model.named_parameters() if p.requires_grad and n.startswith("unet.")}
    if set(lora_sd) != expected:
        raise ValueError(f"the state to save does not hold the student's adapters ({len(expected ^ set(lora_sd))} "
                         f"tensor names differ)")
    lora_sd = {pf.clean_lora_key(k): v for k, v in lora_sd.items()}
    base = Path(base_folder if base_folder is not None else meta["base_model"])
    unet = model.unet
    cls = type(unet).__name__
    pf.write_lora_unet(tmp, unet_folder(base), cls, dict(unet.config), lora_sd, float(meta["adapter"]["scale"]),
                       proj_sd)
    if cls == "UNet2DConditionModel":
        pf.write_sd_lora(tmp, lora_sd, meta["adapter"])
    pf.write_pipeline_parts(tmp, base)
    (tmp / META_FILE).write_text(json.dumps({**meta, "export_format": EXPORT_FORMAT}, indent=2) + "\n")
    swap_in(tmp, folder)


def is_lora_folder(folder: Path) -> bool:
    """Whether `folder` holds one LoRA range model (either layout)."""
    from .pipeline_folders import folder_files

    try:
        f = folder_files(folder)
    except UsageError:
        return False
    return f.lora is not None


def load_model(folder: Path, base_folder: Optional[Path] = None, dtype=None):
    """Any model folder as a module that deme samples: a DemeModel (a full folder, or a LoRA range folder on its
    base), or a DemeUNet (a routed folder: deme merge --method routed)."""
    from .models import load_model_folder
    from .pipeline_folders import folder_files

    f = folder_files(folder)
    if f.routed:
        from .deme_unet import DemeUNet

        try:
            model = DemeUNet.from_pretrained(Path(folder) / "unet")
        except Exception as e:  # a missing or damaged file: OSError, ValueError, safetensors' own error type
            raise UsageError(f"could not load the routed model in '{folder}' ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); merge it again with --force") from None
        return model if dtype is None else model.to(dtype)
    if f.lora is not None:
        return load_lora_model(folder, base_folder, dtype)
    return load_model_folder(folder, dtype)
