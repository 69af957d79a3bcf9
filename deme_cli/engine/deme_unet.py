"""DeMe's UNet for diffusers pipelines: a stock diffusers UNet with DeMe's channel-wise projections, LoRA adapters on a
base UNet, or several range models routed by timestep (the timestep-wise ensemble, Eq. 7 of Decouple-Then-Merge, Ma et
al., CVPR 2025, https://arxiv.org/abs/2410.06664). deme ships this file in `unet/` of every model folder whose UNet is
not a stock one and names it in model_index.json (["deme_unet", "DemeUNet"]), so diffusers loads it without deme:

    pipe = diffusers.DiffusionPipeline.from_pretrained("runs/quickstart/merged", trust_remote_code=True)
It imports torch, diffusers and safetensors (a dependency of diffusers) only; deme imports it as
deme_cli.engine.deme_unet, so the code that samples in deme is the code that ships. The folder (`unet/`):
    config.json                       the stock UNet's config (what pipelines read), "unet_class" and "deme":
                                      {"ranges": [[lo, hi], ...] low t first, or null: one model; "projection": bool;
                                       "lora": null or {"layers": [...], "ranks": [...], "scales": [...]}}
    model-<i>/unet.safetensors        range model i's UNet weights, stock diffusers key names (full models)
    model-<i>/lora.safetensors        range model i's LoRA adapter: <layer>.lora_A.weight, <layer>.lora_B.weight
    model-<i>/projection.safetensors  range model i's projections: down.<k>.weight, mid.0.weight, up.<k>.weight
    base/, deme_unet.py               LoRA models: the base UNet, a stock diffusers UNet folder; this file

Channel-wise projection (DeMe 3.2): a C x C 1x1 convolution (identity-initialised) on the hidden states leaving every
down block, the mid block and every up block (not the skips), applied by forward hooks, so any UNet2DModel /
UNet2DConditionModel config works. Routing: a call at t goes to the range model whose [lo, hi) holds t; a batch with
rows of different t is split by rows. LoRA range models share one base UNet: switching to range model i writes
fl(W + scale_i * B_i @ A_i) (summed in float64) into each adapted weight W in place, and switching away puts W back
exactly (entries where subtracting the delta does not round back to W are kept aside): the base is held once and a
call costs a call of the base. The stock `UNet2DModel.from_pretrained("<folder>/unet")` finds no weights it knows
here and raises, instead of returning a model without projections or adapters.
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

MODULE_FILE, CLASS_NAME, CONFIG_FILE, BASE_DIR = "deme_unet.py", "DemeUNet", "config.json", "base"
UNET_FILE, PROJECTION_FILE, LORA_FILE = "unet.safetensors", "projection.safetensors", "lora.safetensors"
PEFT_PREFIX = "base_model.model."     # what peft's save_pretrained puts before a module name (deme's older files)
_SLOT = "_deme_projection"            # the block attribute its hook reads (not a registered submodule)
_HOOKED = "_deme_projection_hooked"


def model_dir(i: int) -> str:
    return f"model-{i}"          # range model i's files (model 0: the one model of an unrouted folder)


def projection_channels(config: Any) -> dict[str, list[int]]:       # of every down, the mid and every up block
    boc = list(config["block_out_channels"] if isinstance(config, dict) else config.block_out_channels)
    return {"down": boc, "mid": [boc[-1]], "up": boc[::-1]}


def make_projections(config: Any) -> nn.Module:
    """Identity-initialised projections for a UNet config (state keys down.<k>.weight, mid.0.weight, up.<k>.weight)."""
    mod = nn.Module()
    for part, chans in projection_channels(config).items():
        setattr(mod, part, nn.ModuleList([nn.Conv2d(c, c, kernel_size=1, bias=False) for c in chans]))
    with torch.no_grad():
        for conv in mod.modules():
            if isinstance(conv, nn.Conv2d):
                c = conv.weight.shape[0]
                conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    return mod


def _blocks(unet) -> list[tuple[nn.Module, str, int]]:
    out = [(b, "down", k) for k, b in enumerate(unet.down_blocks)]     # (block, projection part, index)
    if unet.mid_block is not None:
        out.append((unet.mid_block, "mid", 0))
    return out + [(b, "up", k) for k, b in enumerate(unet.up_blocks)]


def project(conv: nn.Conv2d, h):
    """The 1x1 convolution `conv` on h (B, C, H, W) as a batched matmul (3x faster than a conv kernel at these sizes)"""
    b, c, hh, ww = h.shape
    return torch.matmul(conv.weight.view(c, c), h.reshape(b, c, hh * ww)).view(b, c, hh, ww)


def _project(block, args, output):
    """The forward hook of a projected block: its projection (the block's slot) applied to its hidden states."""
    conv = block.__dict__.get(_SLOT)
    if conv is None:
        return output
    if isinstance(output, tuple):  # down blocks return (hidden_states, res_samples): project only the hidden states
        return (project(conv, output[0]),) + tuple(output[1:])
    return project(conv, output)


def set_projections(unet, projections: Optional[nn.Module]) -> None:
    """Make the hooks of `unet` apply `projections` (None: none); a block holds its projection as a plain attribute
    (so a deep copy of a model that also holds the projections stays consistent)."""
    for block, part, k in _blocks(unet):
        block.__dict__[_SLOT] = getattr(projections, part)[k] if projections is not None else None


def attach_projections(unet, projections: Optional[nn.Module]) -> None:
    """Apply `projections` to the outputs of `unet`'s blocks from now on (one hook per block, registered once)."""
    set_projections(unet, projections)
    for block, _, _ in _blocks(unet):
        if not block.__dict__.get(_HOOKED):
            block.register_forward_hook(_project)
            block.__dict__[_HOOKED] = True


def detach_projections(unet) -> None:     # remove the projection hooks of `unet`: the stock UNet again
    for block, _, _ in _blocks(unet):
        for key, fn in list(block._forward_hooks.items()):
            if fn is _project:
                del block._forward_hooks[key]
        block.__dict__.pop(_HOOKED, None)
        block.__dict__.pop(_SLOT, None)


def delta_shape(a_shape: Sequence[int], b_shape: Sequence[int]) -> tuple:    # (out, in[, k, k]) of B @ A
    return (b_shape[0],) + tuple(a_shape[1:])


def lora_delta(a, b, scale: float):
    """scale * B @ A as a tensor shaped like the adapted weight, in float64 (A: r x in[ x k x k], B: out x r[ x 1 x 1];
    peft's LoRA with groups = 1)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    r = a64.shape[0]
    return (b64.reshape(b64.shape[0], r) @ a64.reshape(r, -1)).reshape(delta_shape(a.shape, b.shape)) * scale


def with_delta(w, d):                 # fl(W + delta) in W's dtype, summed in float64: a LoRA range model's weight
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
    odd = sorted(set(keys) - {x for pair in out.values() for x in pair}) + [k for k, p in out.items() if None in p]
    if odd:
        raise ValueError(f"the adapter's tensors are not complete LoRA pairs (e.g. '{odd[0]}')")
    return {layer: (a, b) for layer, (a, b) in sorted(out.items())}


def lora_pairs(tensors: dict) -> dict[str, tuple[Any, Any]]:  # {layer: (A, B)}
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


class RangeModel(nn.Module):          # a full range model: a stock UNet and its projections (or None)
    def __init__(self, unet, projections: Optional[nn.Module]):
        super().__init__()
        self.unet, self.projections = unet, projections


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
    projections; a call goes to the range model owning its timestep. `calls[i]`: the calls range model i served."""

    config_name = CONFIG_FILE
    __module__ = "deme_unet"      # what save_pretrained writes into model_index.json: the module file in unet/

    def __init__(self, unet_class: str = "UNet2DModel", deme: Optional[dict] = None,
                 unet_config: Optional[dict] = None):
        super().__init__()
        deme = {"ranges": None, "projection": False, "lora": None, **(deme or {})}
        unet_config = {k: v for k, v in (unet_config or {}).items() if not k.startswith("_")}
        self.register_to_config(unet_class=unet_class, deme=deme, **unet_config)
        cls, n, proj, lora = getattr(diffusers, unet_class), len(deme["ranges"] or [0]), deme["projection"], \
            deme["lora"]
        self.ranges = [(float(lo), float(hi)) for lo, hi in deme["ranges"]] if deme["ranges"] else None
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
        # LoRA: the range model whose deltas the base weights hold now (_active) and, per layer, the flat indices and
        # base values that subtracting the delta would not give back (_saved); _wire() resets both
        self._wire()

    is_lora = property(lambda self: bool(self.config.deme.get("lora")))

    def _wire(self) -> None:          # (re)attach the projection hooks to the UNet(s) this model holds now
        self._active, self._saved = None, {}
        if self.is_lora:
            attach_projections(self.unet, None)
        else:
            for m in self.models:
                attach_projections(m.unet, m.projections)

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """A DemeUNet (random weights) from config.json's contents (stock keys, unet_class, deme)."""
        config = {**dict(config or {}), **kwargs}
        model = cls(config.pop("unet_class", "UNet2DModel"), config.pop("deme", None), config)    # (pops first)
        return (model, {}) if return_unused_kwargs else model

    @classmethod
    def _shell(cls, unet, n: int, ranges, projections, lora: Optional[dict] = None):
        """(A DemeUNet on the meta device shaped like `unet`, to hold existing modules; the n projections or Nones;
        whether there are projections)."""
        projections = list(projections) if projections is not None else [None] * n
        has = any(p is not None for p in projections)
        detach_projections(unet)
        with torch.device("meta"):
            return cls(type(unet).__name__, deme_config(ranges, has, lora), dict(unet.config)), projections, has

    @classmethod
    def from_models(cls, unets: Sequence[Any], projections: Optional[Sequence[Any]] = None,
                    ranges: Optional[Sequence[Sequence[float]]] = None) -> "DemeUNet":
        """Stock UNets (range i's for ranges[i]; one UNet and ranges=None: an unrouted model) with their projections
        (make_projections modules, or None: identity), used as they are (not copied)."""
        model, projections, has = cls._shell(unets[0], len(unets), ranges, projections)
        for m, unet, proj in zip(model.models, unets, projections):
            detach_projections(unet)
            m.unet, m.projections = unet, _identity_if_none(proj, unet) if has else None
        model._wire()
        return model.eval()

    @classmethod
    def from_lora(cls, base_unet, adapters: Sequence[dict], scales: Sequence[float],
                  projections: Optional[Sequence[Any]] = None,
                  ranges: Optional[Sequence[Sequence[float]]] = None) -> "DemeUNet":
        """LoRA range models on one base UNet (used, not copied): adapters[i] holds range model i's tensors (see
        lora_keys), scales[i] its alpha / rank; projections as in from_models."""
        pairs = [lora_pairs(a) for a in adapters]
        if any(list(p) != list(pairs[0]) for p in pairs):
            raise ValueError("the range models adapt different layers; one routed model needs the same targets")
        lora = {"layers": list(pairs[0]), "ranks": [int(next(iter(p.values()))[0].shape[0]) for p in pairs],
                "scales": [float(s) for s in scales]}
        model, projections, has = cls._shell(base_unet, len(adapters), ranges, projections, lora)
        model.unet = base_unet
        for adapter, p in zip(model.adapters, pairs):
            _assign_adapter(adapter, p, base_unet, lora["layers"])
        for k, proj in enumerate(projections if has else []):
            model.projections[k] = _identity_if_none(proj, base_unet)
        model._wire()
        return model.eval()

    def owners(self, timestep, rows: int) -> list[tuple[int, Optional[torch.Tensor]]]:
        """[(range model whose [lo, hi) holds t, its rows or None: all)] of a call at `timestep` on `rows` rows."""
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

    def projection(self, i: int) -> Optional[nn.Module]:          # range model i's projections, or None
        if self.is_lora:
            return None if self.projections is None else self.projections[i]
        return self.models[i].projections

    def _call(self, i: int, sample, timestep, args, kwargs, return_dict: bool):
        self.calls[i] += 1
        self.activate(i)
        unet = self.unet if self.is_lora else self.models[i].unet
        return unet(sample, timestep, *args, return_dict=return_dict, **kwargs)

    @torch.compiler.disable
    @torch.no_grad()
    def activate(self, i: Optional[int]) -> None:
        """LoRA: make the base UNet compute range model i (None: the base), exactly; calls do it (full: no-op)."""
        if i == self._active or not self.is_lora:
            return
        lora = self.config.deme["lora"]
        if self._active is not None:
            j = self._active
            for k, name in enumerate(lora["layers"]):
                w = self.unet.get_submodule(name).weight
                idx, kept = self._saved.pop(name)
                w.copy_((w.to(torch.float64) - self._delta(j, k)).to(w.dtype))
                w.view(-1)[idx.long()] = kept
            self._active = None
            set_projections(self.unet, None)
        if i is not None:
            for k, name in enumerate(lora["layers"]):
                w = self.unet.get_submodule(name).weight
                d = self._delta(i, k)
                new = with_delta(w, d)
                idx = ((new.to(torch.float64) - d).to(w.dtype) != w).view(-1).nonzero().flatten()
                self._saved[name] = (idx.to(torch.int32), w.view(-1)[idx].clone())     # int32: half the memory
                w.copy_(new)
            self._active = i
            set_projections(self.unet, self.projection(i))

    def _delta(self, i: int, k: int):
        return lora_delta(self.adapters[i].A[k], self.adapters[i].B[k], float(self.config.deme["lora"]["scales"][i]))

    def state_dict(self, *args, **kwargs):
        self.activate(None)
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.activate(None)
        return super().load_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):     # state dicts, moves, casts: the base weights (calls switch again)
        if getattr(self, "_active", None) is not None:
            self.activate(None)
        return super()._apply(fn, *args, **kwargs)

    def parts(self) -> list[tuple[str, dict]]:
        """(file name relative to unet/, tensors) of every weight file but the LoRA base's."""
        self.activate(None)
        out = []
        for i in range(len(self.calls)):
            if self.is_lora:
                a, layers = self.adapters[i], self.config.deme["lora"]["layers"]
                out.append((f"{model_dir(i)}/{LORA_FILE}", {**{f"{n}.lora_A.weight": x for n, x in zip(layers, a.A)},
                                                            **{f"{n}.lora_B.weight": x for n, x in zip(layers, a.B)}}))
            else:
                out.append((f"{model_dir(i)}/{UNET_FILE}", self.models[i].unet.state_dict()))
            if (proj := self.projection(i)) is not None:
                out.append((f"{model_dir(i)}/{PROJECTION_FILE}", proj.state_dict()))
        return out

    def save_pretrained(self, save_directory, is_main_process: bool = True, **kwargs) -> None:
        """Write the folder (module docstring); LoRA: the base UNet in base/ with the stock save_pretrained."""
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
        """Load a DemeUNet folder; `torch_dtype` casts it (other options of diffusers' from_pretrained are ignored)."""
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        if not os.path.isfile(os.path.join(folder, CONFIG_FILE)):
            raise OSError(f"'{folder}' holds no {CONFIG_FILE}: DemeUNet loads the unet/ folder of a deme model on "
                          f"disk (DiffusionPipeline.from_pretrained downloads a Hub repository first)")
        with open(os.path.join(folder, CONFIG_FILE)) as f, torch.device("meta"):
            model = cls.from_config(json.load(f))
        if model.is_lora:
            model.unet = getattr(diffusers, model.config.unet_class).from_pretrained(os.path.join(folder, BASE_DIR))
        for i in range(len(model.calls)):
            if model.is_lora:
                _assign_adapter(model.adapters[i], lora_pairs(_read(folder, i, LORA_FILE)), model.unet,
                                model.config.deme["lora"]["layers"])
            else:
                model.models[i].unet.load_state_dict(_read(folder, i, UNET_FILE), assign=True)
            if (proj := model.projection(i)) is not None:
                proj.load_state_dict(_read(folder, i, PROJECTION_FILE), assign=True)
        model._wire()
        if unloaded := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
            raise ValueError(f"'{folder}' does not hold '{unloaded[0]}'; the folder is incomplete")
        return (model if torch_dtype is None else model.to(torch_dtype)).eval()


def deme_config(ranges, projection: bool, lora: Optional[dict]) -> dict:     # config.json's "deme" (module docstring)
    num = lambda x: int(x) if float(x).is_integer() else float(x)  # noqa: E731
    return {"ranges": [[num(lo), num(hi)] for lo, hi in ranges] if ranges else None, "projection": bool(projection),
            "lora": lora}


def _identity_if_none(proj: Optional[nn.Module], unet) -> nn.Module:
    """`proj`, or identity projections on `unet`'s device and dtype (they compute the UNet itself)."""
    if proj is not None:
        return proj
    p = next(unet.parameters())
    return make_projections(unet.config).to(device=p.device, dtype=p.dtype)


def _read(folder: str, i: int, name: str) -> dict:
    if not os.path.isfile(path := os.path.join(folder, model_dir(i), name)):
        raise OSError(f"'{path}' is missing; the folder is incomplete")
    return load_file(path)


def _assign_adapter(adapter: LoraAdapter, pairs: dict, unet, layers: Sequence[str]) -> None:
    """Put an adapter's (A, B) pairs of `layers` into `adapter` (on the device and in the dtype of `unet`)."""
    if list(pairs) != list(layers):
        raise ValueError(f"the adapter's layers are not the {len(layers)} the config names (e.g. {list(layers)[:1]})")
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
