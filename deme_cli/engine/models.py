"""Pretrained pipelines, UNets with channel-wise projections, model folders and the model identity hash.

Channel-wise projection (paper section 3.2): a learnable C x C matrix W (a 1x1 convolution without bias,
initialised to the identity) applied to the hidden states leaving every down block, the mid block and every up
block. Skip connections (the down blocks' residual outputs) are not projected. The projections are attached from
outside diffusers with forward hooks (deme_unet.py, the code that also ships in model folders), so any `UNet2DModel` /
`UNet2DConditionModel` config works; channels come from the config (`block_out_channels`).

A model folder (`ranges/<i>/final/`, `merged/`) is a diffusers pipeline folder plus deme.json (what the model is:
range, steps, base-model hash, recipe name, ...); pipeline_folders.py says what it holds and reads both layouts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError

META_FILE = "deme.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
# deme.json's "export_format": 2 = the UNet weights are the given state (EMA in final/). Folders without it were
# written by deme 0.1.0, whose final/unet held the raw weights next to EMA projections (see exports.py).
EXPORT_FORMAT = 2


# --- locating pretrained pipelines -----------------------------------------------------------------------------

def resolve_pretrained(pretrained: str, revision: Optional[str] = None) -> Path:
    """A local pipeline folder as-is; a hub id downloaded (or found in the cache) with huggingface_hub."""
    p = Path(pretrained).expanduser()
    if p.exists():
        if not p.is_dir():
            raise UsageError(f"model.pretrained '{pretrained}' is a file; point it at a diffusers pipeline folder")
        return p
    looks_like_path = pretrained.startswith((".", "/", "~")) or pretrained.count("/") != 1
    if looks_like_path:
        raise UsageError(f"model folder '{pretrained}' does not exist; set model.pretrained to a diffusers pipeline "
                         f"folder or a hub id like google/ddpm-cifar10-32")
    try:
        from huggingface_hub import snapshot_download

        # configs, tokenizers and the default safetensors weights; not the fp16 / non-EMA variants or the safety
        # checker that Stable Diffusion repositories also hold (several GB we never load)
        return Path(snapshot_download(pretrained, revision=revision,
                                      allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"],
                                      ignore_patterns=["*.fp16.*", "*non_ema*", "safety_checker/*"]))
    except Exception as e:  # offline, unknown repo, gated repo...
        raise UsageError(f"model.pretrained '{pretrained}' is not a folder here (relative paths are read from "
                         f"{Path.cwd()}) and could not be fetched from the hub ({type(e).__name__}); run from the "
                         f"folder the recipe expects, or point model.pretrained at a local pipeline folder") from None


def unet_folder(pipeline_dir: Path) -> Path:
    """The UNet inside a pipeline folder (or the folder itself if it is a UNet folder)."""
    for cand in (pipeline_dir / "unet", pipeline_dir):
        cfg = cand / "config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("_class_name", "").startswith("UNet2D"):
            return cand
    raise UsageError(f"'{pipeline_dir}' holds no diffusers UNet (expected unet/config.json); "
                     f"point model.pretrained at a pipeline saved with save_pretrained")


def scheduler_config(pipeline_dir: Path) -> dict:
    cfg = pipeline_dir / "scheduler" / "scheduler_config.json"
    if not cfg.is_file():
        raise UsageError(f"'{pipeline_dir}' has no scheduler/scheduler_config.json; the pipeline folder must hold its "
                         f"scheduler")
    return json.loads(cfg.read_text())


def load_unet(folder: Path, dtype=None):
    """Load a UNet2DModel or UNet2DConditionModel from a UNet folder or a pipeline folder."""
    import diffusers

    uf = unet_folder(Path(folder))
    cls_name = json.loads((uf / "config.json").read_text())["_class_name"]
    cls = getattr(diffusers, cls_name)
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return cls.from_pretrained(uf, **kw)
    except (OSError, EnvironmentError) as e:
        raise UsageError(f"could not load the UNet from '{uf}': {str(e).splitlines()[0]}") from None


def empty_unet(unet_dir: Path):
    """The UNet of a UNet folder built from its config on the meta device: its architecture (names, shapes, dtypes),
    no weights, no memory."""
    import diffusers
    from accelerate import init_empty_weights

    cfg = json.loads((Path(unet_dir) / "config.json").read_text())
    with init_empty_weights():
        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


# --- projections (the code is deme_unet.py's: the module that ships in model folders) ---------------------------

def projection_channels(config: Any) -> dict[str, list[int]]:
    """Output channels of every down block, the mid block and every up block, from a UNet config."""
    from .deme_unet import projection_channels as channels

    return channels(config)


def make_projections(unet, device=None):
    """A module of identity-initialised projections sized for `unet` (keys down.i.weight, mid.0.weight, up.i.weight),
    in its dtype, on `device` (default: the UNet's; a UNet on the meta device names one)."""
    from .deme_unet import make_projections as make

    return make(unet.config).to(device=unet.device if device is None else device, dtype=unet.dtype)


def identity_projection_state(unet, device=None) -> dict:
    """The projection state dict of the identity (the base of projection task vectors); `device` for a UNet on the
    meta device (empty_unet)."""
    return {k: v.detach().clone() for k, v in make_projections(unet, device).state_dict().items()}


def _deme_model_class():
    from torch import nn

    class DemeModel(nn.Module):
        """A UNet plus optional channel-wise projections. Calling it calls the UNet, with the projections applied.

        `model.unet` can be handed to any diffusers pipeline: the hooks travel with it.
        state_dict keys: `unet.*` and `projections.*`.
        """

        def __init__(self, unet, projections=None):
            from .deme_unet import attach_projections

            super().__init__()
            self.unet = unet
            self.projections = projections
            if projections is not None:
                attach_projections(unet, projections)

        def forward(self, *args, **kwargs):
            return self.unet(*args, **kwargs)

        @property
        def config(self):
            return self.unet.config

        def detach_projections(self):
            from .deme_unet import detach_projections

            detach_projections(self.unet)

    return DemeModel


def DemeModel(unet, projections=None):  # noqa: N802 - a factory that keeps torch out of module import
    return _deme_model_class()(unet, projections)


def wrap(unet, projection: bool):
    """The student: the UNet with identity projections (or none)."""
    return DemeModel(unet, make_projections(unet) if projection else None)


def model_copy(model, dtype=None):
    """An independent copy of a UNet, DemeModel or DemeUNet (in eval mode, on the same device), weights cast to
    `dtype`.

    UNets and DemeModels are built from the config and loaded with the weights (a deep copy of a torch.compile'd or
    hooked module is fragile); a DemeUNet is deep-copied (its hooks read their projections from the blocks)."""
    import copy

    from torch import nn

    from .deme_unet import DemeUNet

    if isinstance(model, DemeUNet):
        p = next(model.parameters())
        return nn.Module.to(copy.deepcopy(model), device=p.device, dtype=dtype or p.dtype).eval()
    is_deme = hasattr(model, "unet") and hasattr(model, "projections")
    unet = model.unet if is_deme else model
    device = next(unet.parameters()).device
    dtype = dtype or next(unet.parameters()).dtype
    new = type(unet).from_config(unet.config)
    new.load_state_dict(unet.state_dict())
    # nn.Module.to: diffusers' override only adds a warning about modules kept in fp32 (none in these UNets)
    new = nn.Module.to(new, device=device, dtype=dtype).eval()
    if not is_deme:
        return new
    proj = copy.deepcopy(model.projections).to(device=device, dtype=dtype) if model.projections is not None else None
    return DemeModel(new, proj).eval()


# --- model folders -----------------------------------------------------------------------------------------------

def split_state(state: dict) -> tuple[dict, dict]:
    """A DemeModel state (unet.*, projections.*) -> (UNet state, projection state), prefixes removed."""
    return ({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")},
            {k[len("projections."):]: v for k, v in state.items() if k.startswith("projections.")})


def save_model_folder(folder: Path, model, meta: dict, state: Optional[dict] = None,
                      base_folder: Optional[Path] = None) -> None:
    """Write a model folder atomically (to folder.tmp, then rename) holding exactly `state` (default: the model's
    own weights; train passes the EMA state). `model` gives the UNet's config; `base_folder` (the pretrained pipeline)
    gives the pipeline's other parts (pipeline_folders.write_pipeline_parts; without it only unet/ and deme.json).

    The weights are written with safetensors directly, not with `unet.save_pretrained(..., state_dict=...)`:
    diffusers' save_pretrained has no `state_dict` parameter, swallows it in **kwargs and saves the live module's
    weights instead (which put the raw weights into every final/ before EXPORT_FORMAT 2)."""
    import shutil

    from .pipeline_folders import write_full_unet, write_pipeline_parts

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    unet_sd, proj_sd = split_state(state if state is not None else model.state_dict())
    expected = set(model.unet.state_dict())
    if set(unet_sd) != expected:
        missing = sorted(expected - set(unet_sd)) or sorted(set(unet_sd) - expected)
        raise ValueError(f"the state to save does not fit the UNet ({len(expected ^ set(unet_sd))} tensor names "
                         f"differ, e.g. '{missing[0]}')")
    write_full_unet(tmp, type(model.unet).__name__, dict(model.unet.config), unet_sd, proj_sd)
    if base_folder is not None:
        write_pipeline_parts(tmp, Path(base_folder))
    (tmp / META_FILE).write_text(json.dumps({**meta, "export_format": EXPORT_FORMAT}, indent=2) + "\n")
    swap_in(tmp, folder)


def swap_in(tmp: Path, folder: Path) -> None:
    """Put the finished folder `tmp` at `folder`; an old `folder` is removed only once the new one is in place."""
    import shutil

    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old)
    else:
        tmp.rename(folder)


def read_meta(folder: Path) -> dict:
    f = Path(folder) / META_FILE
    if not f.is_file():
        raise UsageError(f"'{folder}' is not a deme model folder (no {META_FILE}); train or merge it first")
    return json.loads(f.read_text())


def load_tensors(path: Path, device: str = "cpu") -> dict:
    """The tensors of a model folder's safetensors file; a damaged file is a UsageError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except Exception as e:  # OSError, or safetensors' own error type on a truncated or garbled file
        raise UsageError(f"could not read '{path}' ({type(e).__name__}); the model folder is damaged: train or merge "
                         f"it again with --force") from None


def read_state(files) -> dict:
    """A one-model full folder's weights (pipeline_folders.FolderFiles) as a DemeModel state (unet.*, projections.*)."""
    state = {}
    for p in files.unet:
        state.update({f"unet.{k}": v for k, v in load_tensors(p).items()})
    if files.projection is not None:
        state.update({f"projections.{k}": v for k, v in load_tensors(files.projection).items()})
    return state


def folder_state(folder: Path) -> dict:
    """The weights of a one-model full folder (either layout) as a DemeModel state (unet.*, projections.*)."""
    from .pipeline_folders import folder_files

    return read_state(folder_files(Path(folder)))


def load_model_folder(folder: Path, dtype=None):
    """Load a one-model full folder (either layout) as a DemeModel (projections attached when it has them)."""
    import diffusers

    from .pipeline_folders import folder_files

    files = folder_files(Path(folder))
    if files.routed or files.lora is not None:
        what = "routed range models" if files.routed else "a LoRA adapter"
        raise UsageError(f"'{folder}' is not one full UNet (it holds {what}); load it with adapters.load_model")
    import torch

    with torch.device("meta"):       # no random initialisation: every tensor comes from the files
        model = wrap(getattr(diffusers, files.unet_class).from_config(files.unet_config), files.projection is not None)
    try:
        model.load_state_dict(read_state(files), assign=True)
    except RuntimeError as e:
        raise UsageError(f"the weights in '{folder}' do not fit its UNet config ({str(e).splitlines()[0]}); train or "
                         f"merge it again") from None
    return (model if dtype is None else model.to(dtype)).eval()


def load_base(folder, projection: bool = False, dtype=None):
    """The UNet of a local pipeline (or UNet) folder as a DemeModel, with identity projections if asked (they compute
    the same function). Hub ids are resolved once, by base.resolve_base; stages load through the resolved base."""
    return wrap(load_unet(Path(folder), dtype=dtype), projection)


# --- identity ----------------------------------------------------------------------------------------------------

def state_hash(state: dict) -> str:
    """sha256 over (key, dtype, shape, bytes) of every tensor, in key order: the identity of a set of weights."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def unet_hash(unet) -> str:
    return state_hash(unet.state_dict())
