"""DeMe's UNet for diffusers pipelines: a stock diffusers UNet with the channel-wise projections of DeMe, LoRA adapters
on a base UNet, or several range models routed by timestep (the timestep-wise ensemble, Eq. 7 of Decouple-Then-Merge,
Ma et al., CVPR 2025, https://arxiv.org/abs/2410.06664).

deme copies this file into the `unet/` folder of every model folder whose UNet is not a stock diffusers UNet and names
it in model_index.json (`"unet": ["deme_unet", "DemeUNet"]`), so that diffusers loads the model without deme:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("runs/quickstart/merged", trust_remote_code=True)

It imports torch, diffusers and safetensors (a dependency of diffusers) only; deme imports it as
deme_cli.engine.deme_unet, so the code that samples in deme is the code that ships.

The folder (`unet/`):
    config.json                       the stock UNet's config (what pipelines read: in_channels, sample_size, ...),
                                      "unet_class" (UNet2DModel | UNet2DConditionModel) and "deme":
                                      {"ranges": [[lo, hi], ...] (routed, low t first) or null (one model for every t),
                                       "projection": true | false,
                                       "lora": null or {"layers": [...], "ranks": [...], "scales": [...]}}
    deme_unet.py                      this file
    model-<i>/unet.safetensors        range model i's UNet weights, stock diffusers key names (full models)
    model-<i>/lora.safetensors        range model i's LoRA adapter: <layer>.lora_A.weight, <layer>.lora_B.weight
    model-<i>/projection.safetensors  range model i's projections: down.<k>.weight, mid.0.weight, up.<k>.weight
    base/                             LoRA models: the base UNet, a stock diffusers UNet folder

Channel-wise projection (DeMe section 3.2): a C x C matrix (a 1x1 convolution without bias, initialised to the
identity) applied to the hidden states leaving every down block, the mid block and every up block; skip connections are
not projected. They are applied with forward hooks, so any UNet2DModel / UNet2DConditionModel config works.

Routing: a call at timestep t goes to the range model whose [lo, hi) holds t; a batch whose rows have different t is
split by rows, each row going to its own range model. LoRA range models share one base UNet: switching to range model i
writes fl(W + scale_i * B_i @ A_i) (the sum in float64) into each adapted weight W in place, and switching away puts the
base weights back exactly (the few entries where subtracting the delta does not round back to W are kept aside), so
the base is held once and a call costs what a call of the base costs.

`UNet2DModel.from_pretrained("<folder>/unet")` (the stock class) does not load this folder: it finds no
diffusion_pytorch_model.safetensors there and raises, instead of returning a model without the projections or adapters.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional, Sequence

import diffusers
import torch
from diffusers import ConfigMixin, ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

MODULE_FILE = "deme_unet.py"          # this file, as it ships in unet/
CLASS_NAME = "DemeUNet"
CONFIG_FILE = "config.json"
UNET_FILE = "unet.safetensors"
PROJECTION_FILE = "projection.safetensors"
LORA_FILE = "lora.safetensors"
BASE_DIR = "base"
PEFT_PREFIX = "base_model.model."     # what peft's save_pretrained puts before a module name (deme's older files)
_SLOT = "_deme_projection"            # the block attribute its hook reads (not a registered submodule)
_HOOKED = "_deme_projection_hooked"


def model_dir(i: int) -> str:
    """The subfolder of range model i (model 0: the one model of an unrouted folder)."""
    return f"model-{i}"


# --- channel-wise projections ------------------------------------------------------------------------------------

def projection_channels(config: Any) -> dict[str, list[int]]:
    """Output channels of every down block, the mid block and every up block, from a UNet config."""
    boc = list(config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels)
    return {"down": boc, "mid": [boc[-1]], "up": boc[::-1]}


def _identity_conv(c: int) -> nn.Conv2d:
    conv = nn.Conv2d(c, c, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    return conv


def make_projections(config: Any) -> nn.Module:
    """Identity-initialised projections for a UNet config (state keys down.<k>.weight, mid.0.weight, up.<k>.weight)."""
    mod = nn.Module()
    for part, chans in projection_channels(config).items():
        setattr(mod, part, nn.ModuleList([_identity_conv(c) for c in chans]))
    return mod


def _blocks(unet) -> list[tuple[nn.Module, str, int]]:
    """(block, projection part, index) of every block whose output is projected."""
    out = [(b, "down", k) for k, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        out.append((unet.mid_block, "mid", 0))
    return out + [(b, "up", k) for k, b in enumerate(unet.up_blocks)]


def _project(block, args, output):
    """The forward hook of a projected block: its projection (the block's slot) applied to its hidden states."""
    conv = block.__dict__.get(_SLOT)
    if conv is None:
        return output
    if isinstance(output, tuple):  # down blocks return (hidden_states, res_samples): project only the hidden states
        return (conv(output[0]),) + tuple(output[1:])
    return conv(output)


def set_projections(unet, projections: Optional[nn.Module]) -> None:
    """Make the hooks of `unet` apply `projections` (None: the blocks' outputs pass unchanged). The block holds its
    projection as a plain attribute, so a deep copy of a model that also holds the projections stays consistent."""
    for block, part, k in _blocks(unet):
        block.__dict__[_SLOT] = getattr(projections, part)[k] if projections is not None else None


def attach_projections(unet, projections: Optional[nn.Module]) -> None:
    """Apply `projections` to the outputs of `unet`'s blocks from now on (one hook per block, registered once)."""
    set_projections(unet, projections)
    for block, _, _ in _blocks(unet):
        if not block.__dict__.get(_HOOKED):
            block.register_forward_hook(_project)
            block.__dict__[_HOOKED] = True


def detach_projections(unet) -> None:
    """Remove the projection hooks of `unet`: it computes the stock UNet again."""
    for block, _, _ in _blocks(unet):
        for key, fn in list(block._forward_hooks.items()):
            if fn is _project:
                del block._forward_hooks[key]
        block.__dict__.pop(_HOOKED, None)
        block.__dict__.pop(_SLOT, None)


# --- LoRA ----------------------------------------------------------------------------------------------------------

def delta_shape(a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple:
    """The shape of B @ A's weight delta: (out, in) for a Linear, (out, in, k, k) for a Conv2d."""
    return (b_shape[0],) + tuple(a_shape[1:])


def lora_delta(a, b, scale: float):
    """scale * B @ A as a tensor shaped like the adapted weight, in float64 (A: r x in[ x k x k], B: out x r[ x 1 x 1];
    peft's LoRA with groups = 1)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    r = a64.shape[0]
    return (b64.reshape(b64.shape[0], r) @ a64.reshape(r, -1)).reshape(delta_shape(a.shape, b.shape)) * scale


def with_delta(w, d):
    """fl(W + delta) in W's dtype, the sum taken in float64: the weight of a LoRA range model."""
    return (w.to(torch.float64) + d).to(w.dtype)


def lora_keys(keys) -> dict[str, tuple[str, str]]:
    """{layer: (A key, B key)} of an adapter's tensor names <layer>.lora_A.weight / <layer>.lora_B.weight, sorted by
    layer (peft's "base_model.model." prefix and adapter names such as ".lora_A.default." are accepted)."""
    out: dict[str, list] = {}
    for key in keys:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        for which, slot in (("lora_A", 0), ("lora_B", 1)):
            if f".{which}." in name:
                out.setdefault(name.split(f".{which}.")[0], [None, None])[slot] = key
    paired = {x for pair in out.values() for x in pair}
    odd = sorted(set(keys) - paired) + [f"{layer}.lora_{'AB'[pair.index(None)]}" for layer, pair in out.items()
                                        if None in pair]
    if odd:
        raise ValueError(f"the adapter's tensors are not complete LoRA pairs (e.g. '{odd[0]}')")
    return {layer: (a, b) for layer, (a, b) in sorted(out.items())}


def lora_pairs(tensors: dict) -> dict[str, tuple[Any, Any]]:
    """{layer: (A, B)} of an adapter's tensors (see lora_keys)."""
    return {layer: (tensors[a], tensors[b]) for layer, (a, b) in lora_keys(list(tensors)).items()}


class LoraAdapter(nn.Module):
    """One range model's LoRA adapter: A_k (r x in[ x kh x kw]) and B_k (out x r[ x 1 x 1]) of every adapted layer k."""

    def __init__(self, layers: Sequence[nn.Module], rank: int):
        super().__init__()
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for m in layers:
            if isinstance(m, nn.Conv2d):
                a, b = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
            else:
                a, b = (rank, m.in_features), (m.out_features, rank)
            self.A.append(nn.Parameter(torch.zeros(a), requires_grad=False))
            self.B.append(nn.Parameter(torch.zeros(b), requires_grad=False))


class RangeModel(nn.Module):
    """A full range model: a stock UNet and its projections (or None)."""

    def __init__(self, unet, projections: Optional[nn.Module]):
        super().__init__()
        self.unet, self.projections = unet, projections


# --- the model -----------------------------------------------------------------------------------------------------

def _take(x, rows, n: int):
    """The `rows` of every tensor in x (nested in dicts, lists, tuples) whose first dimension is the batch, n."""
    if torch.is_tensor(x):
        return x[rows.to(x.device)] if x.dim() > 0 and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: _take(v, rows, n) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_take(v, rows, n) for v in x)
    return x


class DemeUNet(ModelMixin, ConfigMixin):
    """One or N range models of a stock diffusers UNet (full, or LoRA adapters on one base), each with optional
    channel-wise projections; a call goes to the range model that owns its timestep (see the module docstring).

    `calls[i]`: the calls range model i served (a call whose rows were split counts once for each part)."""

    config_name = CONFIG_FILE
    __module__ = "deme_unet"      # what save_pretrained writes into model_index.json: the module file in unet/

    def __init__(self, unet_class: str = "UNet2DModel", deme: Optional[dict] = None,
                 unet_config: Optional[dict] = None):
        super().__init__()
        deme = {"ranges": None, "projection": False, "lora": None, **(deme or {})}
        unet_config = {k: v for k, v in (unet_config or {}).items() if not k.startswith("_")}
        self.register_to_config(unet_class=unet_class, deme=deme, **unet_config)
        cls = getattr(diffusers, unet_class)
        n = len(deme["ranges"]) if deme["ranges"] else 1
        self.ranges = [(float(lo), float(hi)) for lo, hi in deme["ranges"]] if deme["ranges"] else None
        proj = bool(deme["projection"])
        lora = deme["lora"]
        if lora:
            self.unet = cls.from_config(unet_config)
            layers = [self.unet.get_submodule(name) for name in lora["layers"]]
            self.adapters = nn.ModuleList([LoraAdapter(layers, int(r)) for r in lora["ranks"]])
            self.projections = nn.ModuleList([make_projections(unet_config) for _ in range(n)]) if proj else None
        else:
            self.models = nn.ModuleList([RangeModel(cls.from_config(unet_config),
                                                    make_projections(unet_config) if proj else None)
                                         for _ in range(n)])
        self.calls = [0] * n
        self._active: Optional[int] = None      # LoRA: the range model whose deltas the base weights hold now
        self._saved: dict = {}                  # LoRA: layer -> (flat indices, base values) not recoverable by rounding
        self._wire()

    # --- structure ---

    @property
    def is_lora(self) -> bool:
        return bool(self.config.deme.get("lora"))

    @property
    def num_models(self) -> int:
        return len(self.calls)

    def _wire(self) -> None:
        """(Re)attach the projection hooks to the UNet(s) this model holds now."""
        if self.is_lora:
            attach_projections(self.unet, None)
            self._active, self._saved = None, {}
        else:
            for m in self.models:
                attach_projections(m.unet, m.projections)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A DemeUNet (random weights) from a config as config.json holds it (stock keys, unet_class, deme)."""
        config = {**dict(config or {}), **kwargs}
        unet_class, deme = config.pop("unet_class", "UNet2DModel"), config.pop("deme", None)
        model = cls(unet_class, deme, config)
        return (model, {}) if return_unused_kwargs else model

    @classmethod
    def from_models(cls, unets: Sequence[Any], projections: Optional[Sequence[Any]] = None,
                    ranges: Optional[Sequence[Sequence[float]]] = None) -> "DemeUNet":
        """A DemeUNet of stock UNets (range i's first, for ranges[i]; one UNet and ranges=None: an unrouted model) and
        their projections (make_projections modules, or None: identity). The modules are used, not copied."""
        projections = list(projections) if projections is not None else [None] * len(unets)
        has = any(p is not None for p in projections)
        with torch.device("meta"):
            model = cls(type(unets[0]).__name__, _deme_config(ranges, has, None), dict(unets[0].config))
        for m, unet, proj in zip(model.models, unets, projections):
            detach_projections(unet)
            m.unet = unet
            m.projections = proj if proj is not None or not has else _on(make_projections(unet.config), unet)
        model._wire()
        return model.eval()

    @classmethod
    def from_lora(cls, base_unet, adapters: Sequence[dict], scales: Sequence[float],
                  projections: Optional[Sequence[Any]] = None,
                  ranges: Optional[Sequence[Sequence[float]]] = None) -> "DemeUNet":
        """A DemeUNet of LoRA range models on one base UNet (used, not copied): adapters[i] holds range model i's
        tensors (see lora_pairs), scales[i] its alpha / rank; projections as in from_models."""
        pairs = [lora_pairs(a) for a in adapters]
        layers = list(pairs[0])
        if any(list(p) != layers for p in pairs):
            raise ValueError("the range models adapt different layers; one routed model needs the same targets")
        ranks = [int(next(iter(p.values()))[0].shape[0]) for p in pairs]
        projections = list(projections) if projections is not None else [None] * len(adapters)
        has = any(p is not None for p in projections)
        lora = {"layers": layers, "ranks": ranks, "scales": [float(s) for s in scales]}
        with torch.device("meta"):
            model = cls(type(base_unet).__name__, _deme_config(ranges, has, lora), dict(base_unet.config))
        detach_projections(base_unet)
        model.unet = base_unet
        for adapter, p in zip(model.adapters, pairs):
            _assign_adapter(adapter, p, base_unet)
        if has:
            for k, proj in enumerate(projections):
                model.projections[k] = proj if proj is not None else _on(make_projections(base_unet.config), base_unet)
        model._wire()
        return model.eval()

    # --- routing ---

    def owners(self, timestep, rows: int) -> list[tuple[int, Optional[torch.Tensor]]]:
        """[(range model, row indices or None for every row)] for a call at `timestep` (a number, or a tensor with one
        entry or one per row) on `rows` rows: the range model whose [lo, hi) holds t."""
        if self.ranges is None:
            return [(0, None)]
        t = torch.as_tensor(timestep).reshape(-1).detach().to("cpu", torch.float64)
        if t.numel() not in (1, rows):
            raise ValueError(f"{t.numel()} timesteps for a batch of {rows} rows")
        owner = torch.full(t.shape, -1, dtype=torch.long)
        for i, (lo, hi) in enumerate(self.ranges):
            owner[(t >= lo) & (t < hi)] = i
        if bool((owner < 0).any()):
            raise ValueError(f"timestep {float(t[owner < 0][0]):g} is outside every range "
                             f"[{self.ranges[0][0]:g}, {self.ranges[-1][1]:g})")
        if t.numel() == 1 or bool((owner == owner[0]).all()):
            return [(int(owner[0]), None)]
        return [(int(i), (owner == i).nonzero().flatten()) for i in owner.unique()]

    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        groups = self.owners(timestep, sample.shape[0])
        if len(groups) == 1:
            return self._call(groups[0][0], sample, timestep, args, kwargs, return_dict)
        n, t = sample.shape[0], torch.as_tensor(timestep, device=sample.device).reshape(-1)
        out, out_type = None, None
        for i, rows in groups:
            res = self._call(i, sample[rows.to(sample.device)], t[rows.to(t.device)], _take(args, rows, n),
                             _take(kwargs, rows, n), True)
            y = res[0]
            if out is None:
                out, out_type = y.new_empty((n,) + tuple(y.shape[1:])), type(res)
            out[rows.to(out.device)] = y
        return out_type(sample=out) if return_dict else (out,)

    def _call(self, i: int, sample, timestep, args, kwargs, return_dict: bool):
        self.calls[i] += 1
        if self.is_lora:
            self.activate(i)
            return self.unet(sample, timestep, *args, return_dict=return_dict, **kwargs)
        return self.models[i].unet(sample, timestep, *args, return_dict=return_dict, **kwargs)

    @torch.compiler.disable
    @torch.no_grad()
    def activate(self, i: Optional[int]) -> None:
        """LoRA: make the base UNet compute range model i (None: the base itself), exactly (module docstring); a call
        does this itself. Full range models: nothing to do."""
        if i == self._active or not self.is_lora:
            return
        lora = self.config.deme["lora"]
        if self._active is not None:
            j = self._active
            for k, name in enumerate(lora["layers"]):
                w = self.unet.get_submodule(name).weight
                idx, kept = self._saved.pop(name)
                w.copy_((w.to(torch.float64) - self._delta(j, k)).to(w.dtype))
                w.view(-1)[idx] = kept
            self._active = None
            set_projections(self.unet, None)
        if i is not None:
            for k, name in enumerate(lora["layers"]):
                w = self.unet.get_submodule(name).weight
                d = self._delta(i, k)
                new = with_delta(w, d)
                idx = ((new.to(torch.float64) - d).to(w.dtype) != w).view(-1).nonzero().flatten()
                self._saved[name] = (idx, w.view(-1)[idx].clone())
                w.copy_(new)
            self._active = i
            set_projections(self.unet, self.projections[i] if self.projections is not None else None)

    def _delta(self, i: int, k: int):
        a = self.adapters[i]
        return lora_delta(a.A[k], a.B[k], float(self.config.deme["lora"]["scales"][i]))

    # state dicts, moves and casts see the base weights (the next call switches again)
    def state_dict(self, *args, **kwargs):
        self.activate(None)
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.activate(None)
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        if getattr(self, "_active", None) is not None:
            self.activate(None)
        return super()._apply(fn, *args, **kwargs)

    # --- files ---

    def parts(self) -> list[tuple[str, dict]]:
        """(file name relative to unet/, tensors) of every weight file but the LoRA base's."""
        self.activate(None)
        out = []
        for i in range(self.num_models):
            d = model_dir(i)
            if self.is_lora:
                a = self.adapters[i]
                tensors = {}
                for k, layer in enumerate(self.config.deme["lora"]["layers"]):
                    tensors[f"{layer}.lora_A.weight"], tensors[f"{layer}.lora_B.weight"] = a.A[k], a.B[k]
                out.append((f"{d}/{LORA_FILE}", tensors))
                proj = self.projections[i] if self.projections is not None else None
            else:
                out.append((f"{d}/{UNET_FILE}", self.models[i].unet.state_dict()))
                proj = self.models[i].projections
            if proj is not None:
                out.append((f"{d}/{PROJECTION_FILE}", proj.state_dict()))
        return out

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """Write this folder's files (module docstring): config.json, this module, the weights as safetensors, and for
        LoRA the base UNet in base/ (with the stock save_pretrained)."""
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        self.save_config(save_directory)
        ship_module(save_directory)
        for name, tensors in self.parts():
            os.makedirs(os.path.join(save_directory, os.path.dirname(name)), exist_ok=True)
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
                      os.path.join(save_directory, name), metadata={"format": "pt"})
        if self.is_lora:
            self.unet.save_pretrained(os.path.join(save_directory, BASE_DIR))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: Optional[str] = None, torch_dtype=None,
                        **kwargs) -> "DemeUNet":
        """Load a DemeUNet folder (module docstring); `torch_dtype` casts it. Other from_pretrained options of diffusers
        (device_map, variant, ...) are not supported and ignored."""
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            raise OSError(f"'{folder}' holds no {CONFIG_FILE}: DemeUNet loads the unet/ folder of a deme model on "
                          f"disk (DiffusionPipeline.from_pretrained downloads a Hub repository first)")
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            config = json.load(f)
        with torch.device("meta"):
            model = cls.from_config(config)
        if model.is_lora:
            model.unet = getattr(diffusers, model.config.unet_class).from_pretrained(os.path.join(folder, BASE_DIR))
            for i, adapter in enumerate(model.adapters):
                _assign_adapter(adapter, lora_pairs(_read(folder, i, LORA_FILE)), model.unet)
            projections = list(model.projections) if model.projections is not None else []
        else:
            for i, m in enumerate(model.models):
                m.unet.load_state_dict(_read(folder, i, UNET_FILE), assign=True)
            projections = [m.projections for m in model.models if m.projections is not None]
        for i, proj in enumerate(projections):
            proj.load_state_dict(_read(folder, i, PROJECTION_FILE), assign=True)
        model._wire()
        unloaded = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if unloaded:
            raise ValueError(f"'{folder}' does not hold '{unloaded[0]}'; the folder is incomplete")
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()


def _num(x):
    x = float(x)
    return int(x) if x.is_integer() else x


def _deme_config(ranges, projection: bool, lora: Optional[dict]) -> dict:
    return {"ranges": [[_num(lo), _num(hi)] for lo, hi in ranges] if ranges else None,
            "projection": bool(projection), "lora": lora}


def _on(module: nn.Module, like) -> nn.Module:
    p = next(like.parameters())
    return module.to(device=p.device, dtype=p.dtype)


def _read(folder: str, i: int, name: str) -> dict:
    path = os.path.join(folder, model_dir(i), name)
    if not os.path.isfile(path):
        raise OSError(f"'{path}' is missing; the folder is incomplete")
    return load_file(path)


def _assign_adapter(adapter: LoraAdapter, pairs: dict, unet) -> None:
    """Put an adapter's (A, B) pairs, in layer order, into `adapter` (on the device and in the dtype of `unet`)."""
    p = next(unet.parameters())
    for k, (a, b) in enumerate(pairs.values()):
        if tuple(adapter.A[k].shape) != tuple(a.shape) or tuple(adapter.B[k].shape) != tuple(b.shape):
            raise ValueError(f"LoRA tensor shapes {tuple(a.shape)}, {tuple(b.shape)} do not fit layer {k} of the "
                             f"base UNet")
        adapter.A[k] = nn.Parameter(a.detach().to(p.device, p.dtype), requires_grad=False)
        adapter.B[k] = nn.Parameter(b.detach().to(p.device, p.dtype), requires_grad=False)


def ship_module(unet_dir) -> None:
    """Copy this module into `unet_dir` (the folder diffusers imports it from)."""
    dest = os.path.join(str(unet_dir), MODULE_FILE)
    if os.path.abspath(dest) != os.path.abspath(__file__):
        shutil.copyfile(__file__, dest)


def folder_config(unet_class: str, unet_config: dict, ranges=None, projection: bool = False,
                  lora: Optional[dict] = None) -> dict:
    """The config.json of a DemeUNet folder, as save_pretrained writes it (for writers that stream the weights)."""
    stock = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
    return {"_class_name": CLASS_NAME, "_diffusers_version": diffusers.__version__, "unet_class": unet_class,
            "deme": _deme_config(ranges, projection, lora), **stock}
