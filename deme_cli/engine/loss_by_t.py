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
from typing import Optional, Sequence

from . import freshness
from .errors import UsageError
from .runs import RunDir

LOSS_PLOT = "loss-by-t.png"


def settings(e) -> dict:
    """The `[eval]` values that determine the loss by timestep."""
    return {"bins": e.loss_bins, "num_images": e.loss_num_images, "seed": e.loss_seed, "reference": e.reference}


def check_reference(e) -> None:
    """The loss is scored on the images of eval.reference (`[eval]`): it must be an image folder (checked before any
    work)."""
    from .fid import reference_kind

    ref = e.reference
    if not ref:
        raise UsageError("eval.metrics has \"loss\", which scores the images of eval.reference, but eval.reference "
                         "is not set; point it at a folder of held-out images")
    kind = reference_kind(ref)
    if kind != "folder":
        raise UsageError(f"eval.metrics has \"loss\", which scores the images of eval.reference, so it must be an "
                         f"image folder; '{ref}' is a {'statistics file' if kind == 'npz' else 'dataset name'}")


def _predict(base, run: RunDir, spec: str, device, base_hash: str, specs: dict):
    """(Predict, identity hash) of a model spec, without the sampler's wrappers (text-to-image conditions).

    A model finetuned from another base than model.pretrained is refused: its ratio to this base would mislead."""
    from .heldout import model_predict
    from .model_specs import load_unets

    loaded = load_unets(base, run, spec, device, **specs)
    info = loaded.info
    made_from = {m.get("base_hash") for m in info.get("members", [])} | {(info.get("meta") or {}).get("base_hash")}
    made_from.discard(None)
    if made_from and made_from != {base_hash}:
        raise UsageError(f"model '{spec}' was finetuned from another base model (base_hash "
                         f"{', '.join(sorted(made_from))}) than model.pretrained = '{base.pretrained}' "
                         f"(base_hash {base_hash}); point model.pretrained at its base, or retrain it")
    # the ensemble and a routed merge are routed models: they split a batch of mixed t by rows themselves
    return model_predict(loaded.denoiser.model), loaded.identity.get("hash")


def _fingerprint(e, base, resolution: int, identity, ref_files: list) -> str:
    blob = {"settings": settings(e), "model": identity, "reference": ref_files,
            "model_section": {"pretrained": base.pretrained, "revision": base.revision},
            "data": {"resolution": resolution}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def score(base, run: RunDir, models: Sequence[str], device, previous: dict, force: bool, *, ev, data,
          specs: dict) -> dict:
    """{model: loss_by_t record} for every model in `models`; `previous` holds the records already in eval/*.json
    (reused when their fingerprint matches, unless `force`).

    ev       [eval] (reference, loss_bins, loss_num_images, loss_seed, batch_size)
    data     [data] (resolution; how a text-to-image reference folder is read)
    specs    how the model specs load (model_specs.spec_settings)
    """
    import torch

    from . import ui
    from .heldout import bin_losses, load_binned
    from .features import _file_key, image_files
    e = ev
    check_reference(e)
    ref_files = [_file_key(Path(f)) for f in image_files(Path(e.reference).expanduser())]
    predicts = {"base": _predict(base, run, "base", device, "", specs)}
    base_hash = predicts["base"][1]
    for m in dict.fromkeys(models):
        if m != "base":
            predicts[m] = _predict(base, run, m, device, base_hash, specs)
    prints = {m: _fingerprint(e, base, data.resolution, h, ref_files) for m, (_, h) in predicts.items()}
    todo = [m for m in models if force or (previous.get(m) or {}).get("fingerprint") != prints[m]]
    # the files of the models just loaded and of the base (freshness.py): a report shows the ratio while they are
    # the same; a kept record whose models were loaded equal (same fingerprint) records their files as they are now
    files = {m: freshness.signature(dict.fromkeys(freshness.model_folders(run, m, base.folder, specs["use_ema"],
                                                                          specs["ranges"].n) + [base.folder]),
                                    run.root, (previous.get(m) or {}).get("model_files"))
             for m in models}
    out = {m: previous[m] if previous[m].get("model_files") == files[m] else {**previous[m], "model_files": files[m]}
           for m in models if m not in todo}
    for m in out:
        ui.info(f"eval {m}: loss by t up to date; --force recomputes it")
    if not todo:
        return out

    unet = base.load_unet()
    held, edges, counts = load_binned(base, data, e.reference, unet, device, bins=e.loss_bins, seed=e.loss_seed,
                                      num_images=e.loss_num_images, batch_size=e.batch_size, what="eval.reference",
                                      images_key="eval.loss_num_images", cache_dir=run.cache)
    base_loss = bin_losses(predicts["base"][0], held, edges)
    for m in todo:
        losses = base_loss if m == "base" else bin_losses(predicts[m][0], held, edges)
        ratio = [a / b for a, b in zip(losses, base_loss)]
        out[m] = {"bins": [list(b) for b in edges], "loss": losses, "ratio": ratio,
                  "ratio_mean": sum(ratio) / len(ratio), "base_loss": base_loss, "images_per_bin": counts,
                  **held.describe(), "precision": "fp32", "fingerprint": prints[m], "model_files": files[m]}
        ui.info(f"eval {m}: held-out loss / base, mean over {len(edges)} bins: {out[m]['ratio_mean']:.4f}")
    del unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def by_bins(curves: dict, bins: Optional[int] = None) -> list[tuple[list, dict]]:
    """[(bin edges, {model: record})]: the models whose loss by timestep was scored on the same bins and the same
    held-out draw (images, noise seed, timestep rule), so their ratios sit under the same edges. The group to compare
    in comes first: the one with `bins` bins (eval.loss_bins) holding the most models, else the largest."""
    groups: dict[str, dict] = {}
    for model, rec in curves.items():
        key = json.dumps([rec.get("bins"), rec.get("images"), rec.get("num_images"), rec.get("noise_seed"),
                          rec.get("timesteps")], default=str)
        groups.setdefault(key, {})[model] = rec
    out = [(next(iter(g.values()))["bins"], g) for g in groups.values()]
    return sorted(out, key=lambda bg: (len(bg[0]) != bins, -len(bg[1])))


def plot(run: RunDir, records: dict, name: str) -> str:
    """eval/loss-by-t.png: every model's ratio to the base against t."""
    from .plots import loss_by_t_plot

    path = run.root / "eval" / LOSS_PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    any_rec = next(iter(records.values()))
    loss_by_t_plot(records, path, f"{name}: held-out loss by timestep, ratio to the base "
                                  f"({any_rec['num_images']} images of eval.reference)")
    return str(path)
