"""LoRA range models (`deme.adapter = "lora"`): each range model is the frozen base UNet plus low-rank adapters.

A range model trains LoRA adapters (Hu et al. 2021, https://arxiv.org/abs/2106.09685, through `peft`, the library
diffusers itself uses) on the UNet's target layers, and its channel-wise projections in full (they are small). For an
adapted layer with base weight W (out x in, or out x in x k x k for a convolution), peft adds

    delta W = scale * B @ A,        scale = lora_alpha / lora_rank,

with A (rank x in[ x k x k]) and B (out x rank[ x 1 x 1]); B starts at zero, so the range model starts as the base.
That delta is the range's task vector on W (tau_i = theta_i - theta of Eq. 8); every other UNet tensor has tau_i = 0.
`deme merge` merges those deltas by any method into a full UNet (task_vectors.py), and a range model is sampled as
the base with its deltas added (`load_lora_model`).

A LoRA range folder (`ranges/<i>/final/`, `final-raw/`) holds, instead of `unet/`:
    lora/adapter_model.safetensors   the adapter weights in peft's format (base_model.model.<module>.lora_A.weight, ...)
    lora/adapter_config.json         peft's LoraConfig (rank, alpha, target modules): with the safetensors file, what
                                     peft.PeftModel.from_pretrained(unet, "lora/") loads
    projection.safetensors, deme.json   as in a full folder; deme.json's "adapter" says kind, rank, alpha, scale,
                                     target modules, and "base_model" names the base's folder
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import UsageError

ADAPTERS = ("full", "lora")
LORA_DIR = "lora"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
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

PEFT_PREFIX = "base_model.model."   # what peft.PeftModel's save_pretrained puts before a module name


def to_peft_key(key: str) -> str:
    """'x.conv1.lora_A.default.weight' (a UNet parameter name) -> 'base_model.model.x.conv1.lora_A.weight' (the keys
    of peft's adapter_model.safetensors: PeftModel.from_pretrained(unet, folder) loads them)."""
    return PEFT_PREFIX + key.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.",
                                                                                       ".lora_B.")


def write_lora(folder: Path, lora_sd: dict, adapter: dict, base_model: str) -> None:
    """lora/adapter_model.safetensors (peft's keys) and lora/adapter_config.json in `folder`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    d = Path(folder) / LORA_DIR
    d.mkdir(parents=True, exist_ok=True)
    save_file({to_peft_key(k): v.detach().to("cpu").contiguous() for k, v in lora_sd.items()},
              str(d / LORA_WEIGHTS), metadata={"format": "pt"})
    config = LoraConfig(r=adapter["rank"], lora_alpha=adapter["alpha"], target_modules=adapter["target_modules"],
                        base_model_name_or_path=base_model)
    config.save_pretrained(str(d))


def is_lora_folder(folder: Path) -> bool:
    return (Path(folder) / LORA_DIR / LORA_WEIGHTS).is_file()


def lora_modules(shapes: dict) -> dict[str, tuple]:
    """{UNet module: (A key, B key)} of a peft-format adapter's tensor names (`shapes`: name -> shape; with or without
    peft's "base_model.model." prefix), checked complete."""
    out = {}
    for k in shapes:
        if k.endswith(".lora_A.weight"):
            b = k[: -len(".lora_A.weight")] + ".lora_B.weight"
            mod = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
            mod = mod[: -len(".lora_A.weight")]
            if b not in shapes:
                raise UsageError(f"the adapter has '{k}' but no '{b}'; retrain the range")
            out[mod] = (k, b)
    if len(out) * 2 != len(shapes):
        odd = sorted(set(shapes) - {x for pair in out.values() for x in pair})
        raise UsageError(f"the adapter holds tensors that are not LoRA pairs (e.g. '{odd[0]}'); retrain the range")
    return out


def delta_shape(a_shape: tuple, b_shape: tuple) -> tuple:
    """The shape of B @ A's weight delta: (out, in) for a Linear, (out, in, k, k) for a Conv2d."""
    return (b_shape[0],) + tuple(a_shape[1:])


def delta(a, b, scale: float):
    """scale * B @ A as a tensor shaped like the adapted weight, in float64 (A: r x in[ x k x k], B: out x r[ x 1 x 1];
    groups = 1, as peft's LoRA requires)."""
    import torch

    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    r = a64.shape[0]
    return (b64.reshape(b64.shape[0], r) @ a64.reshape(r, -1)).reshape(delta_shape(a.shape, b.shape)) * scale


def read_adapter(folder: Path) -> tuple[dict, dict]:
    """(deme.json's "adapter", {tensor name: tensor}) of a LoRA range folder."""
    from safetensors.torch import load_file

    from .models import read_meta

    m = read_meta(folder)
    f = Path(folder) / LORA_DIR / LORA_WEIGHTS
    try:
        return m["adapter"], load_file(str(f))
    except Exception as e:  # OSError, a missing key, or safetensors' own error type on a damaged file
        raise UsageError(f"could not read the LoRA adapter in '{folder}' ({type(e).__name__}); retrain the range "
                         f"with --force") from None


def apply_deltas(unet, adapter: dict, tensors: dict) -> None:
    """Add scale * B @ A to each adapted weight of a plain (un-injected) UNet, in place."""
    import torch

    params = dict(unet.named_parameters())
    scale = float(adapter["scale"])
    with torch.no_grad():
        for mod, (ka, kb) in lora_modules({k: tuple(v.shape) for k, v in tensors.items()}).items():
            w = params.get(mod + ".weight")
            d = delta(tensors[ka], tensors[kb], scale)
            if w is None or tuple(w.shape) != tuple(d.shape):
                raise UsageError(f"the adapter's layer '{mod}' does not fit the base UNet; the range was trained from "
                                 f"another base: retrain it")
            w.copy_((w.to(torch.float64) + d).to(w.dtype))


def load_lora_model(folder: Path, base_folder: Optional[Path] = None, dtype=None):
    """A LoRA range folder as a full DemeModel: the base UNet (`base_folder`, default deme.json's "base_model") with
    the adapter's deltas added, and the projections. The base must be the one the range was trained from."""
    from .models import load_unet, read_meta, unet_hash, with_projections

    folder = Path(folder)
    m = read_meta(folder)
    src = Path(base_folder) if base_folder is not None else Path(m.get("base_model", ""))
    if not str(src) or not src.exists():
        raise UsageError(f"the LoRA range model '{folder}' needs its base model, '{src}', which is not there; point "
                         f"model.pretrained at it")
    unet = load_unet(src)
    if m.get("base_hash") and unet_hash(unet) != m["base_hash"]:
        raise UsageError(f"the LoRA range model '{folder}' was trained from another base model than '{src}' "
                         f"(base_hash {m['base_hash']}); point model.pretrained at its base or retrain it")
    adapter, tensors = read_adapter(folder)
    apply_deltas(unet, adapter, tensors)
    if dtype is not None:
        unet = unet.to(dtype)
    return with_projections(unet, folder)



def save_lora_folder(folder: Path, model, meta: dict, state: dict) -> None:
    """Write a LoRA range folder atomically (models.save_model_folder's contract): `state` holds exactly the student's
    trained tensors (unet.*lora_A/B*, projections.*); meta must say "adapter" and "base_model"."""
    import shutil

    from safetensors.torch import save_file

    from .models import EXPORT_FORMAT, META_FILE, PROJECTION_FILE, swap_in

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    lora_sd = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    proj_sd = {k[len("projections."):]: v for k, v in state.items() if k.startswith("projections.")}
    expected = {n[len("unet."):] for n, p in model.named_parameters() if p.requires_grad and n.startswith("unet.")}
    if set(lora_sd) != expected:
        raise ValueError(f"the state to save does not hold the student's adapters ({len(expected ^ set(lora_sd))} "
                         f"tensor names differ)")
    write_lora(tmp, lora_sd, meta["adapter"], meta["base_model"])
    if proj_sd:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in proj_sd.items()}, str(tmp / PROJECTION_FILE))
    (tmp / META_FILE).write_text(json.dumps({**meta, "export_format": EXPORT_FORMAT}, indent=2) + "\n")
    swap_in(tmp, folder)


def load_model(folder: Path, base_folder: Optional[Path] = None, dtype=None):
    """Any model folder (a full one, or a LoRA range folder on its base) as a DemeModel."""
    from .models import load_model_folder

    if is_lora_folder(folder):
        return load_lora_model(folder, base_folder, dtype)
    return load_model_folder(folder, dtype)


def is_model_folder(folder: Path) -> bool:
    """Whether `folder` holds a model's weights (unet/ or a LoRA adapter)."""
    return (Path(folder) / "unet").is_dir() or is_lora_folder(folder)
