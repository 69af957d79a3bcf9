"""`deme sample`: generate images from the base, merged, range or ensemble model with per-image seeds.

Image k uses seed + k: its initial noise and any per-step noise (DDPM, DDIM with eta > 0) come from its own
`torch.Generator(seed + k)` on the CPU, so the noise of an image does not depend on the batch size, the device or
the other images. The denoising loop is our own (not a diffusers pipeline) and talks to a *denoiser*: an object with

    sample_shape            (C, H, W) of the space the scheduler works in (pixels here; latents for Stable Diffusion)
    condition(conds)        per-batch context from per-image conditions (None for unconditional models)
    __call__(x, t, ctx)     the model output (epsilon) at integer timestep t; every row of x shares t
    decode(x)               images in [-1, 1]

so a text-to-image denoiser (prompts, guidance, VAE decode) plugs into the same loop (`DENOISER_KINDS`).

The "ensemble" (the paper's "before merge", Eq. 7) routes each denoising step to the range model whose [lo, hi)
holds t; all samples of a batch share t and one scheduler, so multistep solvers see one history.

Batch invariance on the CPU: the noise is per image by construction; the arithmetic is made batch-size independent
by (1) padding every model call to the full batch size (the last, partial batch is filled with copies of its last
image, whose results are dropped), because some CPU kernels take another path for a batch of 1, and (2) computing
linear layers whose input rows are all equal (the timestep embedding: every row shares t) on one row. With these,
images are bit-identical across batch sizes 2-32 on our CPUs (tested: 8 vs 3); very large batches may switch
convolution algorithms and differ in the last float bit. GPUs choose kernels by batch size, so there images agree
up to floating-point rounding.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from .errors import UsageError
from .runs import RunDir, read_json, write_json
from .speed import compile_backend
from .text2image import text_to_image

SAMPLES_JSON = "samples.json"
GRID_FILE = "grid.png"
GRID_MAX = 64                                   # images in grid.png
_PNG = re.compile(r"^(\d{6})\.png$")


# --- schedulers --------------------------------------------------------------------------------------------------

def _ddim(cfg: dict, eta: float):
    from diffusers import DDIMScheduler
    return DDIMScheduler.from_config(cfg), {"eta": eta}


def _ddpm(cfg: dict, eta: float):
    from diffusers import DDPMScheduler
    return DDPMScheduler.from_config(cfg), {}


def _dpm_solver_pp(cfg: dict, eta: float):
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++"), {}


def _pndm(cfg: dict, eta: float):
    from diffusers import PNDMScheduler
    return PNDMScheduler.from_config(cfg), {}


# name -> factory(pipeline scheduler config, eta) -> (scheduler, extra kwargs for scheduler.step)
SCHEDULERS: dict[str, Callable[[dict, float], tuple[Any, dict]]] = {
    "ddim": _ddim,                    # Song et al. 2021; eta = 0 is deterministic (the release samples DDIM-50, eta 0)
    "ddpm": _ddpm,                    # ancestral sampling of Ho et al. 2020
    "dpm-solver++": _dpm_solver_pp,   # Lu et al. 2022, multistep, deterministic
    "pndm": _pndm,                    # Liu et al. 2022 (Stable Diffusion v1's default)
}


def make_scheduler(name: str, config: dict, eta: float = 0.0):
    """A fresh scheduler built from the pretrained pipeline's scheduler config; returns (scheduler, step kwargs)."""
    try:
        factory = SCHEDULERS[name]
    except KeyError:
        raise UsageError(f"unknown scheduler '{name}' (known: {', '.join(SCHEDULERS)})") from None
    scheduler, step_kw = factory(config, eta)
    if "generator" in inspect.signature(scheduler.step).parameters:
        step_kw["_wants_generator"] = True
    return scheduler, step_kw


# --- devices and precision ---------------------------------------------------------------------------------------

def pick_device(choice: str = "auto"):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device is 'cuda' but no CUDA device is available; set train.device = \"auto\"")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def resolve_precision(precision: str, device) -> str:
    """auto: bf16 on CUDA, fp32 on the CPU (bf16 autocast is ~13x slower on our CPUs)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def _autocast(precision: str, device):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


@contextlib.contextmanager
def shared_rows(modules: Sequence[Any]) -> Iterator[None]:
    """Compute 2-D linear layers whose input rows are all equal (the timestep embedding) on one row.

    Same values, less work, and the result no longer depends on how many rows there are (CPU BLAS picks other
    kernels for other batch sizes).
    """
    import torch
    import torch.nn.functional as F

    def hook(mod, args, out):
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] > 1 and torch.equal(x, x[:1].expand_as(x)):
            return F.linear(x[:1], mod.weight, mod.bias).expand_as(out)
        return out

    handles = [m.register_forward_hook(hook) for mod in modules for m in mod.modules()
               if isinstance(m, torch.nn.Linear)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --- denoisers ---------------------------------------------------------------------------------------------------

class UNetDenoiser:
    """An unconditional (pixel-space) UNet or DemeModel: epsilon = model(x, t).sample; images are x itself."""

    def __init__(self, model, size: Optional[int] = None):
        self.model = model
        cfg = model.config
        size = cfg.sample_size or size                # some configs leave sample_size unset: the caller's size
        if size is None:
            raise UsageError("the UNet config has no sample_size; set data.resolution to the image size it makes")
        size = size if isinstance(size, int) else size[0]
        self.sample_shape = (int(cfg.in_channels), int(size), int(size))

    @property
    def modules(self) -> list:
        return [self.model]

    def condition(self, conds: Optional[Sequence[Any]]) -> Any:
        return None

    dtype = None                                      # weights dtype after cast(); None: as loaded (autocast)

    def __call__(self, x, t, ctx):
        """ctx: extra UNet keyword arguments (text embeddings for Stable Diffusion), or None."""
        return self.model(x if self.dtype is None else x.to(self.dtype), t, **(ctx or {})).sample

    def decode(self, x):
        return x

    def cast(self, dtype) -> None:
        """Sample with a copy of the model whose weights are `dtype` (half precision without autocast's casts)."""
        from .models import model_copy

        self.model, self.dtype = model_copy(self.model, dtype), dtype

    def compile(self) -> None:
        import torch
        self.model = torch.compile(self.model, backend=compile_backend())


class EnsembleDenoiser(UNetDenoiser):
    """The timestep-wise ensemble (paper Eq. 7): the range model whose [lo, hi) holds t predicts epsilon at t."""

    def __init__(self, models: Sequence[Any], ranges: Sequence[Any], size: Optional[int] = None):
        from .ranges import range_owning

        if len(models) != len(ranges):
            raise ValueError(f"{len(models)} models for {len(ranges)} ranges")
        super().__init__(models[0], size)
        self.models, self.ranges, self._owning = list(models), list(ranges), range_owning
        self.calls = [0] * len(models)          # model evaluations per range (for samples.json and tests)

    @property
    def modules(self) -> list:
        return self.models

    def route(self, t: int) -> int:
        return self._owning(int(t), self.ranges).index

    def __call__(self, x, t, ctx):
        i = self.route(int(t))
        self.calls[i] += 1
        return self.models[i](x if self.dtype is None else x.to(self.dtype), t, **(ctx or {})).sample

    def cast(self, dtype) -> None:
        from .models import model_copy

        self.models, self.dtype = [model_copy(m, dtype) for m in self.models], dtype

    def compile(self) -> None:
        import torch
        self.models = [torch.compile(m, backend=compile_backend()) for m in self.models]


# --- the denoising loop ------------------------------------------------------------------------------------------

def to_uint8(images) -> np.ndarray:
    """Model-space images in [-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounded as diffusers does."""
    import torch

    x = ((images.float() + 1) / 2).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _batches(n: int, batch_size: int) -> Iterator[list[int]]:
    for s in range(0, n, batch_size):
        yield list(range(s, min(s + batch_size, n)))


def generate_batches(denoiser, scheduler_name: str, steps: int, seeds: Sequence[int], *, scheduler_config: dict,
                     conds: Optional[Sequence[Any]] = None, eta: float = 0.0, batch_size: int = 64,
                     precision: str = "auto", device=None, compile: bool = False
                     ) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (positions in `seeds`, uint8 images (n, H, W, C)) batch by batch. See `generate`."""
    import torch

    device = device if device is not None else next(denoiser.modules[0].parameters()).device
    precision = resolve_precision(precision, device)
    # Half precision: UNets that can be cast run on a half-precision copy of their weights without autocast (GroupNorm
    # and the residual adds stay in half precision too: faster, as diffusers pipelines do with torch_dtype=float16);
    # the rest (text-to-image encoders, the VAE decode) runs under autocast.
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    cast = half is not None and hasattr(denoiser, "cast")
    if cast:
        denoiser.cast(half)
    if compile:
        denoiser.compile()
    exact = device.type == "cpu" and not compile
    C, H, W = denoiser.sample_shape
    with torch.no_grad(), (shared_rows(denoiser.modules) if exact else contextlib.nullcontext()):
        for pos in _batches(len(seeds), batch_size):
            rows = pos + [pos[-1]] * (batch_size - len(pos))     # pad to a full batch; the copies are dropped
            gens = [torch.Generator("cpu").manual_seed(int(seeds[k])) for k in rows]
            scheduler, step_kw = make_scheduler(scheduler_name, scheduler_config, eta)
            wants_gen = step_kw.pop("_wants_generator", False)
            scheduler.set_timesteps(steps, device=device)
            x = torch.cat([torch.randn((1, C, H, W), generator=g) for g in gens]).to(device)
            x = x * scheduler.init_noise_sigma
            ctx = denoiser.condition([conds[k] for k in rows] if conds is not None else None)
            for t in scheduler.timesteps:
                inp = scheduler.scale_model_input(x, t)
                with contextlib.nullcontext() if cast else _autocast(precision, device):
                    eps = denoiser(inp, t, ctx)
                kw = dict(step_kw, generator=gens) if wants_gen else step_kw
                x = scheduler.step(eps.float(), t, x, **kw).prev_sample
            with _autocast(precision, device):
                images = denoiser.decode(x)
            yield pos, to_uint8(images[:len(pos)])


def generate(denoiser, scheduler_name: str, steps: int, seeds: Sequence[int], *, scheduler_config: dict,
             conds: Optional[Sequence[Any]] = None, eta: float = 0.0, batch_size: int = 64, precision: str = "auto",
             device=None, compile: bool = False, progress: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Generate len(seeds) images in memory: image j starts from torch.Generator(seeds[j]); returns uint8 (N, H, W, C).

    `denoiser`: a UNetDenoiser / EnsembleDenoiser (or any object with the denoiser interface); `conds`: one condition
    per image (prompts, for text-to-image denoisers); `progress(n)` is called after every batch of n images.
    """
    out: list[Optional[np.ndarray]] = [None] * len(seeds)
    for pos, images in generate_batches(denoiser, scheduler_name, steps, seeds, scheduler_config=scheduler_config,
                                        conds=conds, eta=eta, batch_size=batch_size, precision=precision,
                                        device=device, compile=compile):
        for j, img in zip(pos, images):
            out[j] = img
        if progress is not None:
            progress(len(pos))
    return np.stack(out) if out else np.zeros((0, 0, 0, 0), np.uint8)


def sample_images(model, recipe, num_images: int, *, steps: Optional[int] = None, seed: Optional[int] = None,
                  batch_size: Optional[int] = None, device=None) -> np.ndarray:
    """Images from an in-memory (Deme)model with the recipe's sampler settings (for the merge weight search)."""
    from .models import resolve_pretrained, scheduler_config

    s = recipe.sample
    base = s.seed if seed is None else seed
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    cfg = scheduler_config(pipeline_dir)
    loaded = with_conditions(recipe, pipeline_dir, device or next(model.parameters()).device,
                             lambda: Loaded(UNetDenoiser(model, recipe.data.resolution), {}))
    return generate(loaded.denoiser, s.scheduler, steps or s.steps, [base + k for k in range(num_images)],
                    scheduler_config=cfg, conds=loaded.conds_for(range(num_images)), eta=s.eta,
                    batch_size=batch_size or s.batch_size, precision=s.precision, device=device)


# --- model specs: base | merged | range:I | ensemble -----------------------------------------------------------

@dataclass
class Loaded:
    denoiser: Any
    info: dict                                   # what samples.json records about the model
    identity: dict = field(default_factory=dict)  # what must match for a resume (hashes)
    cond: Optional[Callable[[int], Any]] = None  # the condition of image k (its prompt), None if unconditional
    settings: dict = field(default_factory=dict)  # more settings that determine the pixels (guidance, prompts)
    record: dict = field(default_factory=dict)    # more samples.json entries ("prompts": one per image)

    def conds_for(self, indices) -> Optional[list]:
        return None if self.cond is None else [self.cond(k) for k in indices]


def _model_info(folder: Path, model) -> tuple[dict, str]:
    from .models import read_meta, state_hash

    meta = read_meta(folder)
    meta = {k: v for k, v in meta.items() if k != "recipe_toml"}
    return meta, state_hash(model.state_dict())


def _load_folder(folder: Path, what: str, how: str, device):
    from .models import load_model_folder

    if not (folder / "unet").is_dir():
        raise UsageError(f"no {what} at '{folder}'; run '{how}' first")
    return load_model_folder(folder).to(device).eval()


def _load_base(recipe, run: RunDir, device) -> Loaded:
    from .models import load_base, resolve_pretrained, unet_hash

    model = load_base(recipe.model.pretrained, recipe.model.revision).to(device).eval()
    h = unet_hash(model.unet)
    info = {"folder": str(resolve_pretrained(recipe.model.pretrained, recipe.model.revision)),
            "pretrained": recipe.model.pretrained, "hash": h}
    return Loaded(UNetDenoiser(model, recipe.data.resolution), info, {"hash": h})


def _load_merged(recipe, run: RunDir, device) -> Loaded:
    model = _load_folder(run.merged, "merged model", "deme merge RECIPE", device)
    meta, h = _model_info(run.merged, model)
    return Loaded(UNetDenoiser(model, recipe.data.resolution), {"folder": str(run.merged), "meta": meta, "hash": h},
                  {"hash": h})


def _range_folder(recipe, run: RunDir, i: int) -> Path:
    return run.final(i, ema=recipe.merge.use_ema)


def _load_range(recipe, run: RunDir, device, i: int) -> Loaded:
    if not 0 <= i < recipe.ranges.n:
        raise UsageError(f"range {i} does not exist: ranges.n is {recipe.ranges.n} (use range:0 ... "
                         f"range:{recipe.ranges.n - 1})")
    folder = _range_folder(recipe, run, i)
    model = _load_folder(folder, f"model for range {i}", f"deme train RECIPE --range {i}", device)
    meta, h = _model_info(folder, model)
    return Loaded(UNetDenoiser(model, recipe.data.resolution), {"folder": str(folder), "meta": meta, "hash": h},
                  {"hash": h})


def _load_ensemble(recipe, run: RunDir, device) -> Loaded:
    from .splitting import load_ranges

    if not run.ranges_json.is_file():
        raise UsageError(f"no ranges in '{run.root}' (ranges.json is missing); run 'deme train RECIPE --all' first")
    ranges = load_ranges(recipe, run)
    models, members = [], []
    for r in ranges:
        folder = _range_folder(recipe, run, r.index)
        model = _load_folder(folder, f"model for range {r.index}", f"deme train RECIPE --range {r.index}", device)
        meta, h = _model_info(folder, model)
        trained = meta.get("range")
        if trained and (int(trained["lo"]), int(trained["hi"])) != (r.lo, r.hi):
            raise UsageError(f"the model in '{folder}' was trained for [{trained['lo']}, {trained['hi']}) but "
                             f"ranges.json says range {r.index} is [{r.lo}, {r.hi}); retrain it with --force")
        models.append(model)
        members.append({"range": r.as_dict(), "folder": str(folder), "hash": h, "base_hash": meta.get("base_hash")})
    bases = {m["base_hash"] for m in members if m["base_hash"]}
    if len(bases) > 1:
        raise UsageError("the range models were finetuned from different base models (base_hash differs); retrain "
                         "them from one recipe")
    return Loaded(EnsembleDenoiser(models, ranges, recipe.data.resolution),
                  {"members": members, "routing": "range owning t (Eq. 7)"}, {"hash": [m["hash"] for m in members]})


MODEL_SPECS: dict[str, Callable[..., Loaded]] = {
    "base": _load_base,
    "merged": _load_merged,
    "ensemble": _load_ensemble,
}


def parse_model_spec(spec: str) -> tuple[str, Optional[int]]:
    """'base' | 'merged' | 'ensemble' | 'range:I' -> (kind, I)."""
    spec = spec.strip()
    m = re.fullmatch(r"range:(\d+)", spec)
    if m:
        return "range", int(m.group(1))
    if spec in MODEL_SPECS:
        return spec, None
    raise UsageError(f"unknown model '{spec}' (use one of {', '.join(MODEL_SPECS)} or range:I)")


def load_model(recipe, run: RunDir, spec: str, device) -> Loaded:
    from .models import resolve_pretrained

    kind, i = parse_model_spec(spec)
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    return with_conditions(recipe, pipeline_dir, device, lambda: _load_range(recipe, run, device, i) if kind == "range"
                           else MODEL_SPECS[kind](recipe, run, device))


def _unconditional(recipe, device, load: Callable[[], Loaded]) -> Loaded:
    return load()


# model kind -> (recipe, device, load() -> Loaded of the UNet(s)) -> Loaded ready to sample. A kind checks its own
# inputs (prompts, encoders) before calling load(), so bad input fails before big models are read.
DENOISER_KINDS: dict[str, Callable[..., Loaded]] = {
    "unconditional": _unconditional,
    "text-to-image": text_to_image,             # text2image.py: prompts, classifier-free guidance, VAE decode
}


def with_conditions(recipe, pipeline_dir: Path, device, load: Callable[[], Loaded]) -> Loaded:
    from .models import is_text_to_image

    return DENOISER_KINDS["text-to-image" if is_text_to_image(pipeline_dir) else "unconditional"](recipe, device, load)


# --- `deme sample` -----------------------------------------------------------------------------------------------

def existing_images(folder: Path) -> dict[int, Path]:
    """Numbered PNGs (000000.png ...) in a sample folder, by index."""
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        m = _PNG.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _save_png(path: Path, img: np.ndarray, size: Optional[int]) -> None:
    from PIL import Image

    im = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    tmp = path.with_name(f".{path.name}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def write_grid(folder: Path, n: int, out: Path) -> Optional[Path]:
    """grid.png of the first up to 64 numbered images in `folder`."""
    from PIL import Image

    files = existing_images(folder)
    idx = sorted(k for k in files if k < n)[:GRID_MAX]
    if not idx:
        return None
    ims = [Image.open(files[k]).convert("RGB") for k in idx]
    w, h = ims[0].size
    cols = math.ceil(math.sqrt(len(ims)))
    rows = math.ceil(len(ims) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for j, im in enumerate(ims):
        grid.paste(im, ((j % cols) * w, (j // cols) * h))
    tmp = out.with_name(f".{out.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, out)
    return out


def _settings(recipe, spec: str, loaded: Loaded, precision: str) -> dict:
    """What determines the pixels: a resume must match these."""
    s = recipe.sample
    return {"model": spec, "model_hash": loaded.identity.get("hash"), "scheduler": s.scheduler, "steps": s.steps,
            "eta": s.eta if s.scheduler == "ddim" else None, "seed": s.seed, "precision": precision,
            "output_size": s.output_size}


@dataclass(frozen=True)
class Shard:
    """Process `rank` of `count` makes the images k with k % count == rank (each writes its own PNGs)."""

    rank: int = 0
    count: int = 1

    def owns(self, k: int) -> bool:
        return k % self.count == self.rank

    @staticmethod
    def parse(text: str) -> "Shard":
        """'I/P' -> Shard(I, P)."""
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise UsageError(f"--shard expects I/P with 0 <= I < P, like 0/2; got '{text}'")
        return Shard(int(m.group(1)), int(m.group(2)))


def _distributed(device_choice: str = "auto"):
    """(Shard, device, barrier) when run under `accelerate launch` / torchrun with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=device_choice == "cpu" or not torch.cuda.is_available())
    return Shard(state.process_index, state.num_processes), state.device, state.wait_for_everyone


class _Job:
    """One `deme sample` run: the model loaded, its settings, and the sample folder."""

    def __init__(self, recipe, run: RunDir, spec: str, device, target=None):
        """`device`: where the model is loaded; `target`: where the images are made (default: `device`)."""
        from .models import resolve_pretrained, scheduler_config
        from .speed import use_compile

        s = self.s = recipe.sample
        self.recipe, self.spec, self.device = recipe, spec, device
        target = target if target is not None else device
        self.kind, _ = parse_model_spec(spec)
        self.precision = resolve_precision(s.precision, target)
        self.sched_cfg = scheduler_config(resolve_pretrained(recipe.model.pretrained, recipe.model.revision))
        make_scheduler(s.scheduler, self.sched_cfg, s.eta)       # fail on a bad scheduler before loading models
        self.loaded = load_model(recipe, run, spec, device)
        self.folder = run.samples(spec)
        self.meta_path = self.folder / SAMPLES_JSON
        self.settings = {**_settings(recipe, spec, self.loaded, self.precision), **self.loaded.settings}
        self.compile, self.target = use_compile(s.compile, target), target

    def check_resume(self, force: bool) -> dict[int, Path]:
        """Images already in the folder; refuses (UsageError) when they were made with other settings."""
        have = existing_images(self.folder)
        if have and not force:
            old = read_json(self.meta_path).get("settings") if self.meta_path.is_file() else None
            changed = [k for k in self.settings if old is None or old.get(k) != self.settings[k]]
            if changed:
                raise UsageError(f"'{self.folder}' holds {len(have)} images made with other settings "
                                 f"({', '.join(changed)}); re-run with --force to regenerate them")
        return have

    def start(self, have: dict, force: bool, processes: int = 1) -> dict:
        """Remove old images on --force, write samples.json (complete: false); returns the record."""
        s = self.s
        if force:  # inputs are valid and the model loaded: now the old images go, so no mix of old and new remains
            for p in have.values():
                p.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        record = {"model": self.spec, "kind": self.kind, "model_info": self.loaded.info, "settings": self.settings,
                  "scheduler": s.scheduler,
                  "scheduler_class": type(make_scheduler(s.scheduler, self.sched_cfg)[0]).__name__,
                  "steps": s.steps, "eta": self.settings["eta"],
                  "seeds": {"base": s.seed, "count": s.num_images, "rule": "image k uses seed + k"},
                  "precision": self.precision, "device": self.target.type, "compile": self.compile,
                  "batch_size": s.batch_size, "num_images": s.num_images, "processes": processes,
                  **({"sharding": "image k is made by process k % processes"} if processes > 1 else {}),
                  **self.loaded.record, "complete": False}
        write_json(self.meta_path, record)
        return record

    def generate(self, shard: Shard = Shard()) -> dict:
        """Make the missing images this shard owns; returns {"generated", "time_s", "calls"}."""
        from . import ui

        s = self.s
        have = existing_images(self.folder)
        todo = [k for k in range(s.num_images) if k not in have and shard.owns(k)]
        t0 = time.time()
        if todo:
            seeds = [s.seed + k for k in todo]
            mine = len([k for k in range(s.num_images) if shard.owns(k)])
            desc = f"sample {self.spec}" + (f" [{shard.rank}/{shard.count}]" if shard.count > 1 else "")
            with ui.progress(desc, total=mine, start=mine - len(todo), unit="img", every=max(1, s.batch_size)) as bar:
                for pos, images in generate_batches(self.loaded.denoiser, s.scheduler, s.steps, seeds,
                                                    scheduler_config=self.sched_cfg,
                                                    conds=self.loaded.conds_for(todo), eta=s.eta,
                                                    batch_size=s.batch_size, precision=self.precision,
                                                    device=self.device, compile=self.compile):
                    for j, img in zip(pos, images):
                        _save_png(self.folder / f"{todo[j]:06d}.png", img, s.output_size)
                    bar.update(len(pos))
        return {"generated": len(todo), "time_s": time.time() - t0,
                "calls": getattr(self.loaded.denoiser, "calls", None)}

    def finish(self, record: dict, generated: int, elapsed: float, calls: Optional[list] = None) -> dict:
        """grid.png and the complete samples.json."""
        s = self.s
        grid = write_grid(self.folder, s.num_images, self.folder / GRID_FILE) if s.grid else None
        missing = s.num_images - len([k for k in existing_images(self.folder) if k < s.num_images])
        record.update(complete=missing == 0, generated=generated, skipped=s.num_images - generated - missing,
                      time_s=round(elapsed, 3),
                      images_per_s=round(generated / elapsed, 3) if generated and elapsed > 0 else None,
                      grid=grid.name if grid else None, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if missing:
            record["missing"] = missing
        if calls is not None:  # the ensemble (also inside a text-to-image denoiser)
            record["model_info"]["calls_per_range"] = calls
        write_json(self.meta_path, record)
        return {**record, "folder": str(self.folder)}


def _shard_file(folder: Path, shard: Shard) -> Path:
    return folder / f".shard-{shard.rank}-of-{shard.count}.json"


def _sum_calls(parts: list) -> Optional[list]:
    calls = [c for c in parts if c is not None]
    return [sum(x) for x in zip(*calls)] if calls else None


def run_sample(recipe, run: RunDir, spec: str, force: bool = False, processes: int = 1, gpus: str = "auto",
               shard: Optional[Shard] = None) -> dict:
    """Write run.samples(spec)/000000.png ..., grid.png and samples.json; skip images already written.

    The images can be made by several processes, each making the images k with k % P == its rank (the pixels do not
    depend on which process makes an image: per-image seeds, batch-invariant arithmetic on the CPU):
    - under `accelerate launch --num_processes P` (or torchrun): every process runs this; the main one writes
      samples.json and grid.png once all are done;
    - `processes` = P > 1: this process starts P `deme sample --shard I/P` workers (launch.run_jobs, one per slot
      of `gpus`), waits for them and writes samples.json and grid.png;
    - `shard` = I/P: a worker of the above; writes only its PNGs (and a small .shard file the main process reads).
    """
    if shard is not None:
        return _sample_worker(recipe, run, spec, shard)
    if processes > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("--processes starts its own processes; under accelerate launch or torchrun leave it out "
                             "(the launched processes already share the images)")
        return _sample_fan_out(recipe, run, spec, force, processes, gpus)
    dist = _distributed(recipe.train.device)
    if dist is None:
        job = _Job(recipe, run, spec, pick_device(recipe.train.device))
        record = job.start(job.check_resume(force), force)
        out = job.generate()
        return job.finish(record, out["generated"], out["time_s"], out["calls"])

    # Under accelerate launch: the main process removes (--force) and writes samples.json; all make their share.
    me, device, barrier = dist
    t0 = time.time()
    job = _Job(recipe, run, spec, device)
    have = job.check_resume(force)                # every process checks, so a refusal stops them all alike
    barrier()
    record = job.start(have, force, me.count) if me.rank == 0 else None
    barrier()
    out = job.generate(me)
    write_json(_shard_file(job.folder, me), {**out, "time_s": round(out["time_s"], 3)})
    barrier()
    if me.rank != 0:
        return {"model": spec, "shard": f"{me.rank}/{me.count}", **out, "folder": str(job.folder)}
    return _collect(job, record, me.count, time.time() - t0)


def _collect(job: "_Job", record: dict, count: int, elapsed: float) -> dict:
    parts = []
    for r in range(count):
        f = _shard_file(job.folder, Shard(r, count))
        if f.is_file():
            parts.append(read_json(f))
            f.unlink()
    return job.finish(record, sum(p["generated"] for p in parts), elapsed, _sum_calls([p.get("calls") for p in parts]))


def _sample_worker(recipe, run: RunDir, spec: str, shard: Shard) -> dict:
    """`deme sample --shard I/P`: make this shard's missing images (the starting process checked the settings)."""
    job = _Job(recipe, run, spec, pick_device(recipe.train.device))
    if not job.meta_path.is_file():
        raise UsageError(f"--shard is for workers started by 'deme sample --processes'; '{job.meta_path}' is missing")
    out = job.generate(shard)
    write_json(_shard_file(job.folder, shard), {**out, "time_s": round(out["time_s"], 3)})
    return {"model": spec, "shard": f"{shard.rank}/{shard.count}", **out, "folder": str(job.folder)}


def _sample_fan_out(recipe, run: RunDir, spec: str, force: bool, processes: int, gpus: str) -> dict:
    """`deme sample --processes P`: P worker processes on the slots of `gpus`, then samples.json and the grid.

    When a worker fails, returns the record with "failed" (shard names) and "report" (exit codes, log tails)."""
    import torch

    from . import launch

    on_cpu = recipe.train.device == "cpu" or (gpus == "auto" and not torch.cuda.is_available())
    slots = launch.device_slots(f"cpu:{processes}" if on_cpu else gpus)
    on_cpu = on_cpu or not slots[0].gpus
    # the model is loaded here for its identity (settings) and the checks only: on the CPU, GPUs stay free for workers
    job = _Job(recipe, run, spec, torch.device("cpu"), target=torch.device("cpu" if on_cpu else "cuda"))
    record = job.start(job.check_resume(force), force, processes)
    recipe_file = launch.write_launch_recipe(recipe, run)
    for r in range(processes):
        _shard_file(job.folder, Shard(r, processes)).unlink(missing_ok=True)
    folder = job.folder

    n, seen = recipe.sample.num_images, {"t": 0.0, "have": {}}

    def progress(rank: int):
        def read() -> tuple:
            if time.time() - seen["t"] > 1.0:          # one folder listing per poll, shared by the shards
                seen.update(t=time.time(), have=existing_images(folder))
            return sum(1 for k in seen["have"] if k < n and k % processes == rank), len(range(rank, n, processes))
        return read

    have = existing_images(folder)
    busy = {k % processes for k in range(recipe.sample.num_images) if k not in have}   # shards with work left
    jobs = [launch.Job(f"shard {r}/{processes}", ["sample", str(recipe_file), "--model", spec, "--shard",
                                                  f"{r}/{processes}"],
                       folder.parent / f".{folder.name}-shard-{r}.log", progress(r)) for r in sorted(busy)]
    t0 = time.time()
    if jobs:
        launch.run_jobs(jobs, slots, f"deme sample {spec}", poll_s=2.0)
    failed = [j.name for j in jobs if j.returncode]
    if failed:  # samples.json stays incomplete; the logs stay for the report
        return {**record, "folder": str(folder), "failed": failed, "report": launch.failure_report(jobs)}
    for j in jobs:
        j.log.unlink(missing_ok=True)
    return _collect(job, record, processes, time.time() - t0)
