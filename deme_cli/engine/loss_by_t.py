"""`deme eval` metric "loss": each model's held-out denoising loss in equal timestep bins, as a ratio to the base.

Where a model gains and where it loses, before paying for FID: the images of eval.reference (an image folder; up to
eval.loss_num_images of them, evenly spaced), image k with one fixed noise draw and one timestep drawn inside bin
k mod eval.loss_bins (seeded by eval.loss_seed), the same for every model, so the ratio of two models' losses in a bin
is their difference and not the draw's. Models are the names `deme sample --model` takes: base, merged, range:I and
ensemble (each row routed to the range model owning its t, Eq. 7). No samples are needed; fp32.

Written into eval/<model>.json as "loss_by_t" (bins, loss, ratio = loss / the base's loss in the bin, so the base is
1, ratio_mean = the mean of the ratios over bins, which weighs every bin equally; the plain mean over t would be
dominated by small t, where an epsilon-prediction's loss is ~150x larger) and as metrics.loss_ratio; the curves are
drawn in eval/loss-by-t.png.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

from .errors import UsageError
from .runs import RunDir

LOSS_PLOT = "loss-by-t.png"


def settings(recipe) -> dict:
    e = recipe.eval
    return {"bins": e.loss_bins, "num_images": e.loss_num_images, "seed": e.loss_seed, "reference": e.reference}


def check_reference(recipe) -> None:
    """The loss is scored on the images of eval.reference: it must be an image folder (checked before any work)."""
    from .metrics import reference_kind

    ref = recipe.eval.reference
    if not ref:
        raise UsageError("eval.metrics has \"loss\", which scores the images of eval.reference, but eval.reference "
                         "is not set; point it at a folder of held-out images")
    kind = reference_kind(ref)
    if kind != "folder":
        raise UsageError(f"eval.metrics has \"loss\", which scores the images of eval.reference, so it must be an "
                         f"image folder; '{ref}' is a {'statistics file' if kind == 'npz' else 'dataset name'}")


def _predict(recipe, run: RunDir, spec: str, device, base_hash: str):
    """(Predict, identity hash) of a model spec, without the sampler's wrappers (text-to-image conditions).

    A model finetuned from another base than model.pretrained is refused: its ratio to this base would mislead."""
    from .denoise import EnsembleDenoiser
    from .heldout import model_predict, routed_predict
    from .model_specs import load_unets

    loaded = load_unets(recipe, run, spec, device)
    info = loaded.info
    made_from = {m.get("base_hash") for m in info.get("members", [])} | {(info.get("meta") or {}).get("base_hash")}
    made_from.discard(None)
    if made_from and made_from != {base_hash}:
        raise UsageError(f"model '{spec}' was finetuned from another base model (base_hash "
                         f"{', '.join(sorted(made_from))}) than model.pretrained = '{recipe.model.pretrained}' "
                         f"(base_hash {base_hash}); point model.pretrained at its base, or retrain it")
    d = loaded.denoiser
    predict = routed_predict(d.models, d.ranges) if isinstance(d, EnsembleDenoiser) else model_predict(d.model)
    return predict, loaded.identity.get("hash")


def _fingerprint(recipe, identity, ref_files: list) -> str:
    blob = {"settings": settings(recipe), "model": identity, "reference": ref_files,
            "model_section": recipe.model.model_dump(), "data": {"resolution": recipe.data.resolution}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def score(recipe, run: RunDir, models: Sequence[str], device, previous: dict, force: bool) -> dict:
    """{model: loss_by_t record} for every model in `models`; `previous` holds the records already in eval/*.json
    (reused when their fingerprint matches, unless `force`)."""
    import torch

    from . import ui
    from .heldout import binned_means, binned_timesteps, equal_bins, load_heldout, per_image_losses
    from .metrics import _file_key, image_files
    from .models import load_unet, resolve_pretrained

    e = recipe.eval
    check_reference(recipe)
    ref_files = [_file_key(Path(f)) for f in image_files(Path(e.reference).expanduser())]
    predicts = {"base": _predict(recipe, run, "base", device, "")}
    base_hash = predicts["base"][1]
    for m in dict.fromkeys(models):
        if m != "base":
            predicts[m] = _predict(recipe, run, m, device, base_hash)
    prints = {m: _fingerprint(recipe, h, ref_files) for m, (_, h) in predicts.items()}
    todo = [m for m in models if force or (previous.get(m) or {}).get("fingerprint") != prints[m]]
    out = {m: previous[m] for m in models if m not in todo}
    for m in out:
        ui.info(f"eval {m}: loss by t up to date; --force recomputes it")
    if not todo:
        return out

    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    unet = load_unet(pipeline_dir)
    held = load_heldout(recipe, e.reference, unet, device, num_images=e.loss_num_images, seed=e.loss_seed,
                        timesteps=lambda n, T: binned_timesteps(n, T, e.loss_bins, e.loss_seed),
                        timesteps_rule=f"image k: uniform in bin k mod {e.loss_bins} (seed {e.loss_seed})",
                        batch_size=e.batch_size, what="eval.reference")
    T = int(held.scheduler.config.num_train_timesteps)
    edges = equal_bins(T, e.loss_bins)
    counts = [int(((held.t >= lo) & (held.t < hi)).sum()) for lo, hi in edges]
    if min(counts) == 0:
        raise UsageError(f"eval.reference holds {held.n} images, fewer than eval.loss_bins = {e.loss_bins}; score "
                         f"more images or use fewer bins")
    base = binned_means(per_image_losses(predicts["base"][0], held), held.t, edges)
    for m in todo:
        losses = base if m == "base" else binned_means(per_image_losses(predicts[m][0], held), held.t, edges)
        ratio = [a / b for a, b in zip(losses, base)]
        out[m] = {"bins": [list(b) for b in edges], "loss": losses, "ratio": ratio,
                  "ratio_mean": sum(ratio) / len(ratio), "base_loss": base, "images_per_bin": counts,
                  **held.describe(), "precision": "fp32", "fingerprint": prints[m]}
        ui.info(f"eval {m}: held-out loss / base, mean over {len(edges)} bins: {out[m]['ratio_mean']:.4f}")
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def plot(run: RunDir, records: dict, recipe) -> str:
    """eval/loss-by-t.png: every model's ratio to the base against t."""
    from .plots import loss_by_t_plot

    path = run.root / "eval" / LOSS_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    any_rec = next(iter(records.values()))
    loss_by_t_plot(records, path, f"{recipe.name}: held-out loss by timestep, ratio to the base "
                                  f"({any_rec['num_images']} images of eval.reference)")
    return str(path)
