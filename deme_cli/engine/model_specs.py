"""Model specs: `base`, `merged`, `range:I` and `ensemble` of a run dir, loaded as a denoiser ready to sample.

`load_model(base, run, spec, device, ranges=..., use_ema=..., resolution=..., sample=...)` returns a `denoise.Loaded`:
the denoiser (denoise.py's protocol), what samples.json records about the model, its identity (hashes: what must match
for a resume) and, for text-to-image pipelines, the condition of image k (its prompt: the base's model kind wraps the
UNet(s) for sampling, kinds.py). `sample_images` samples an in-memory model with `[sample]`'s settings (the merge
weight search).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .denoise import Loaded, UNetDenoiser, generate
from .errors import UsageError
from .exports import refuse_stale
from .runs import RunDir


# --- model specs: base | merged | range:I | ensemble -----------------------------------------------------------

def _model_info(folder: Path, model) -> tuple[dict, str]:
    from .models import read_meta, state_hash

    meta = read_meta(folder)
    meta = {k: v for k, v in meta.items() if k != "recipe_toml"}
    return meta, state_hash(model.state_dict())


def _load_folder(folder: Path, what: str, how: str, device, base=None, upgrade: str = ""):
    """A model folder as a DemeModel (a routed one as a DemeUNet) on `device`; a LoRA range folder is loaded on
    `base`'s UNet (adapters.py). `upgrade`: the command that rewrites a folder of the older layout (said once)."""
    from .adapters import load_model
    from .pipeline_folders import is_model_folder, note_old_layout

    if not is_model_folder(folder):
        raise UsageError(f"no {what} at '{folder}'; run '{how}' first")
    note_old_layout(folder, upgrade or f"'{how}'")
    return load_model(folder, base.folder if base is not None else None).to(device).eval()


def _load_base(base, run: RunDir, device, ranges, use_ema: bool, resolution: int) -> Loaded:
    from .models import unet_hash

    model = base.load().to(device).eval()
    h = unet_hash(model.unet)
    info = {"folder": str(base.folder), "pretrained": base.pretrained, "hash": h}
    return Loaded(UNetDenoiser(model, resolution), info, {"hash": h})


def _load_merged(base, run: RunDir, device, ranges, use_ema: bool, resolution: int) -> Loaded:
    model = _load_folder(run.merged, "merged model", "deme merge RECIPE", device)
    meta, h = _model_info(run.merged, model)
    return Loaded(UNetDenoiser(model, resolution), {"folder": str(run.merged), "meta": meta, "hash": h}, {"hash": h})


def _range_folder(run: RunDir, i: int, use_ema: bool) -> Path:
    """Range i's final/ (EMA, refused when exported before the EMA fix) or final-raw/ (merge.use_ema = false)."""
    if use_ema:
        refuse_stale(run, [i])
    return run.final(i, ema=use_ema)


def _load_range(base, run: RunDir, device, ranges, use_ema: bool, resolution: int, i: int) -> Loaded:
    check_model_spec(f"range:{i}", ranges.n)
    folder = _range_folder(run, i, use_ema)
    model = _load_folder(folder, f"model for range {i}", f"deme train RECIPE --range {i}", device, base,
                         upgrade=f"'deme train RECIPE --range {i}' (no training)")
    meta, h = _model_info(folder, model)
    return Loaded(UNetDenoiser(model, resolution), {"folder": str(folder), "meta": meta, "hash": h}, {"hash": h})


def _load_ensemble(base, run: RunDir, device, ranges, use_ema: bool, resolution: int) -> Loaded:
    """The timestep-wise ensemble (Eq. 7) as one routed DemeUNet (routed.py): LoRA range models share one base."""
    from .models import read_meta
    from .pipeline_folders import is_model_folder, note_old_layout
    from .routed import ensemble_unet
    from .splitting import load_ranges

    if not run.ranges_json.is_file():
        raise UsageError(f"no ranges in '{run.root}' (ranges.json is missing); run 'deme train RECIPE --all' first")
    owned = load_ranges(base, ranges, run)
    folders, metas = [], []
    for r in owned:
        folder = _range_folder(run, r.index, use_ema)
        if not is_model_folder(folder):
            raise UsageError(f"no model for range {r.index} at '{folder}'; run 'deme train RECIPE --range {r.index}' "
                             f"first")
        note_old_layout(folder, "'deme train RECIPE --all' (no training)")
        meta = {k: v for k, v in read_meta(folder).items() if k != "recipe_toml"}
        trained = meta.get("range")
        if trained and (int(trained["lo"]), int(trained["hi"])) != (r.lo, r.hi):
            raise UsageError(f"the model in '{folder}' was trained for [{trained['lo']}, {trained['hi']}) but "
                             f"ranges.json says range {r.index} is [{r.lo}, {r.hi}); retrain it with --force")
        folders.append(folder)
        metas.append(meta)
    bases = {m.get("base_hash") for m in metas if m.get("base_hash")}
    if len(bases) > 1:
        raise UsageError("the range models were finetuned from different base models (base_hash differs); retrain "
                         "them from one recipe")
    model, hashes = ensemble_unet(base, folders, owned, device)
    members = [{"range": r.as_dict(), "folder": str(f), "hash": h, "base_hash": m.get("base_hash")}
               for r, f, h, m in zip(owned, folders, hashes, metas)]
    return Loaded(UNetDenoiser(model.eval(), resolution),
                  {"members": members, "routing": "range owning t (Eq. 7)"}, {"hash": hashes})


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


def check_model_spec(spec: str, n: int) -> tuple[str, Optional[int]]:
    """parse_model_spec, and a range:I must name one of the n ranges."""
    kind, i = parse_model_spec(spec)
    if kind == "range" and not 0 <= i < n:
        raise UsageError(f"range {i} does not exist: ranges.n is {n} (use range:0 ... range:{n - 1})")
    return kind, i


def spec_settings(ranges, merge, data) -> dict:
    """What loading a model spec takes from the recipe: [ranges] (N), merge.use_ema (the range models' EMA or raw
    weights) and data.resolution (the sample size of UNets whose config has none): `load_unets`' keywords."""
    return {"ranges": ranges, "use_ema": merge.use_ema, "resolution": data.resolution}


def load_unets(base, run: RunDir, spec: str, device, *, ranges, use_ema: bool,
               resolution: int) -> Loaded:
    """The UNet(s) of a model spec as a plain UNet or ensemble denoiser, without the model kind's sampling wrapper
    (text-to-image conditions): for scoring held-out losses.

    ranges      [ranges] (N; ranges.json is read from the run)
    use_ema     merge.use_ema: range models from final/ (EMA) or final-raw/
    resolution  data.resolution, pixels (the sample size of UNets whose config has none)
    """
    kind, i = parse_model_spec(spec)
    args = (base, run, device, ranges, use_ema, resolution)
    return _load_range(*args, i) if kind == "range" else MODEL_SPECS[kind](*args)


def load_model(base, run: RunDir, spec: str, device, *, ranges, use_ema: bool, resolution: int,
               sample) -> Loaded:
    """A model spec ready to sample with `[sample]`'s settings (prompts and guidance for text-to-image)."""
    parse_model_spec(spec)
    return base.kind.denoiser(base, sample, resolution, device,
                              lambda: load_unets(base, run, spec, device, ranges=ranges, use_ema=use_ema,
                                                 resolution=resolution))


def in_memory(model, base, sample, resolution: int, device) -> Loaded:
    """An in-memory (Deme)model wrapped for sampling with `[sample]`'s prompts and guidance (the model kind's)."""
    return base.kind.denoiser(base, sample, resolution, device, lambda: Loaded(UNetDenoiser(model, resolution), {}))


def sample_images(model, base, sample, resolution: int, num_images: int, *,
                  steps: Optional[int] = None, seed: Optional[int] = None, batch_size: Optional[int] = None,
                  device=None, loaded: Optional[Loaded] = None) -> np.ndarray:
    """Images from an in-memory (Deme)model with `[sample]`'s sampler settings (the merge weight search, training
    previews). `loaded`: `in_memory(model, ...)` made once by a caller that samples the same model again and again."""
    s = sample
    first = s.seed if seed is None else seed
    device = device or next(model.parameters()).device
    loaded = loaded or in_memory(model, base, s, resolution, device)
    return generate(loaded.denoiser, s.scheduler, steps or s.steps, [first + k for k in range(num_images)],
                    scheduler_config=base.scheduler_config, conds=loaded.conds_for(range(num_images)), eta=s.eta,
                    batch_size=batch_size or s.batch_size, precision=s.precision, device=device)
