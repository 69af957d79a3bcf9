"""Pretrained pipelines, UNets with channel-wise projections, model folders and the model identity hash.

Channel-wise projection (paper section 3.2): a learnable C x C matrix W (a 1x1 convolution without bias,
initialised to the identity) applied to the hidden states leaving every down block, the mid block and every up
block. Skip connections (the down blocks' residual outputs) are not projected. The projections are attached from
outside diffusers with forward hooks, so any `UNet2DModel` / `UNet2DConditionModel` config works; channels come from
the config (`block_out_channels`).

A model folder (`ranges/<i>/final/`, `merged/`) holds:
    unet/                      diffusers `save_pretrained` (safetensors): loads in stock diffusers
    projection.safetensors     projection weights (absent when the model has none)
    deme.json                  what the model is (range, steps, base-model hash, recipe name, ...)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError

PROJECTION_FILE = "projection.safetensors"
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


# --- projections -------------------------------------------------------------------------------------------------

def projection_channels(config: Any) -> dict[str, list[int]]:
    """Output channels of every down block, the mid block and every up block, from a UNet config."""
    boc = list(config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels)
    return {"down": boc, "mid": [boc[-1]], "up": boc[::-1]}


def _identity_conv(c: int):
    import torch
    from torch import nn

    conv = nn.Conv2d(c, c, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    return conv


def make_projections(unet, device=None):
    """A module of identity-initialised projections sized for `unet` (keys down.i.weight, mid.0.weight, up.i.weight),
    on `device` (default: the UNet's)."""
    from torch import nn

    ch = projection_channels(unet.config)
    mod = nn.Module()
    for part, chans in ch.items():
        setattr(mod, part, nn.ModuleList([_identity_conv(c) for c in chans]))
    return mod.to(device=unet.device if device is None else device, dtype=unet.dtype)


def identity_projection_state(unet, device=None) -> dict:
    """The projection state dict of the identity (the base of projection task vectors); `device` for a UNet on the
    meta device (empty_unet)."""
    return {k: v.detach().clone() for k, v in make_projections(unet, device).state_dict().items()}


def _hook(conv, tuple_out: bool):
    def hook(module, args, output):
        if tuple_out:  # down blocks return (hidden_states, res_samples): project only the hidden states
            return (conv(output[0]),) + tuple(output[1:])
        return conv(output)
    return hook


def attach_projections(unet, projections) -> list:
    """Register forward hooks that apply `projections` to the outputs of the UNet's blocks. Returns the handles."""
    handles = []
    for block, conv in zip(unet.down_blocks, projections.down):
        handles.append(block.register_forward_hook(_hook(conv, tuple_out=True)))
    if unet.mid_block is not None:
        handles.append(unet.mid_block.register_forward_hook(_hook(projections.mid[0], tuple_out=False)))
    for block, conv in zip(unet.up_blocks, projections.up):
        handles.append(block.register_forward_hook(_hook(conv, tuple_out=False)))
    return handles


def _deme_model_class():
    from torch import nn

    class DemeModel(nn.Module):
        """A UNet plus optional channel-wise projections. Calling it calls the UNet, with the projections applied.

        `model.unet` can be handed to any diffusers pipeline: the hooks travel with it.
        state_dict keys: `unet.*` and `projections.*`.
        """

        def __init__(self, unet, projections=None):
            super().__init__()
            self.unet = unet
            self.projections = projections
            self._handles = attach_projections(unet, projections) if projections is not None else []

        def forward(self, *args, **kwargs):
            return self.unet(*args, **kwargs)

        @property
        def config(self):
            return self.unet.config

        def detach_projections(self):
            for h in self._handles:
                h.remove()
            self._handles = []

    return DemeModel


def DemeModel(unet, projections=None):  # noqa: N802 - a factory that keeps torch out of module import
    return _deme_model_class()(unet, projections)


def wrap(unet, projection: bool):
    """The student: the UNet with identity projections (or none)."""
    return DemeModel(unet, make_projections(unet) if projection else None)


def model_copy(model, dtype=None):
    """An independent copy of a UNet or DemeModel (in eval mode, on the same device), weights cast to `dtype`.

    Built from the config and loaded with the weights, not deep-copied: the projection hooks are closures over the
    original projection modules, so a deep copy would keep calling those.
    """
    import copy

    from torch import nn

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

def save_model_folder(folder: Path, model, meta: dict, state: Optional[dict] = None) -> None:
    """Write a model folder atomically (to folder.tmp, then rename) holding exactly `state` (default: the model's
    own weights; train passes the EMA state). `model` gives the UNet's config.

    The UNet's weights are written with safetensors directly, not with `unet.save_pretrained(..., state_dict=...)`:
    diffusers' save_pretrained has no `state_dict` parameter, swallows it in **kwargs and saves the live module's
    weights instead (which put the raw weights into every final/ before EXPORT_FORMAT 2)."""
    import shutil

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    sd = state if state is not None else model.state_dict()
    unet_sd = {k[len("unet."):]: v for k, v in sd.items() if k.startswith("unet.")}
    proj_sd = {k[len("projections."):]: v for k, v in sd.items() if k.startswith("projections.")}
    expected = set(model.unet.state_dict())
    if set(unet_sd) != expected:
        missing = sorted(expected - set(unet_sd)) or sorted(set(unet_sd) - expected)
        raise ValueError(f"the state to save does not fit the UNet ({len(expected ^ set(unet_sd))} tensor names "
                         f"differ, e.g. '{missing[0]}')")
    (tmp / "unet").mkdir()
    model.unet.save_config(tmp / "unet")
    write_weights(tmp, unet_sd, proj_sd)
    (tmp / META_FILE).write_text(json.dumps({**meta, "export_format": EXPORT_FORMAT}, indent=2) + "\n")
    swap_in(tmp, folder)


def write_weights(folder: Path, unet_sd: dict, proj_sd: dict) -> None:
    """unet/diffusion_pytorch_model.safetensors (what diffusers' from_pretrained reads) and, when there are
    projections, projection.safetensors, each holding exactly the given tensors (on the CPU, contiguous)."""
    from safetensors.torch import save_file

    def cpu(sd: dict) -> dict:
        return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}

    save_file(cpu(unet_sd), str(folder / "unet" / UNET_WEIGHTS), metadata={"format": "pt"})
    if proj_sd:
        save_file(cpu(proj_sd), str(folder / PROJECTION_FILE))


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


def load_model_folder(folder: Path, dtype=None):
    """Load a model folder back as a DemeModel (projections attached when present)."""
    folder = Path(folder)
    return with_projections(load_unet(folder, dtype=dtype), folder)


def with_projections(unet, folder: Path):
    """`unet` as a DemeModel with the projections of model folder `folder` (none when it has no projection file)."""
    from safetensors.torch import load_file

    proj = None
    pf = Path(folder) / PROJECTION_FILE
    if pf.is_file():
        proj = make_projections(unet)
        proj.load_state_dict(load_file(str(pf), device=str(unet.device)))
    return DemeModel(unet, proj)


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
