"""Model specs: `base`, `merged`, `range:I` and `ensemble` of a run dir, loaded as a denoiser ready to sample.

`load_model(recipe, run, spec, device)` returns a `Loaded`: the denoiser (denoise.py's protocol), what samples.json
records about the model, its identity (hashes: what must match for a resume) and, for text-to-image pipelines, the
condition of image k (its prompt; `DENOISER_KINDS` picks text2image.py's denoiser from the pipeline folder).
`sample_images` samples an in-memory model with a recipe's sampler settings (the merge weight search).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .denoise import EnsembleDenoiser, UNetDenoiser, generate
from .errors import UsageError
from .exports import refuse_stale
from .runs import RunDir
from .text2image import text_to_image


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
    """Range i's final/ (EMA, refused when exported before the EMA fix) or final-raw/ (merge.use_ema = false)."""
    if recipe.merge.use_ema:
        refuse_stale(run, [i])
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


def load_unets(recipe, run: RunDir, spec: str, device) -> Loaded:
    """The UNet(s) of a model spec as a plain UNet or ensemble denoiser, without a model kind's sampling wrapper
    (text-to-image conditions): for scoring held-out losses."""
    kind, i = parse_model_spec(spec)
    return _load_range(recipe, run, device, i) if kind == "range" else MODEL_SPECS[kind](recipe, run, device)


def load_model(recipe, run: RunDir, spec: str, device) -> Loaded:
    from .models import resolve_pretrained

    parse_model_spec(spec)
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    return with_conditions(recipe, pipeline_dir, device, lambda: load_unets(recipe, run, spec, device))


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
