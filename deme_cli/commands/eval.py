"""`deme eval`: score each model's samples and write one JSON per model.

FID / KID through clean-fid (engine/features.py: the images' features; engine/fid.py: the reference and the
distances), CLIP score (engine/clip.py) and the held-out loss by timestep (engine/loss_by_t.py). A model's result is
reused while the inputs it was computed from (its fingerprint) are unchanged. The scores go into the model cards of
merged/ and the range folders (engine/model_card.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..engine import freshness, model_card
from ..engine.base import Base, resolve_base
from ..engine.clip import clip_score, load_clip
from ..engine.errors import UsageError
from ..engine.features import (BACKEND, MODES, FeatureExtractor, _file_key, extractor_key, files_features,
                               image_files, load_extractor)
from ..engine.fid import load_reference, reference_kind, score_features
from ..engine.recipe import DataSection, EvalSection, MergeSection, RangesSection, SampleSection, stage_kwargs
from ..engine.images import check_readable
from ..engine.runs import RunDir, read_json, read_record, write_json


# --- `deme eval` -------------------------------------------------------------------------------------------------

@dataclass
class _Job:
    model: str
    folder: Path
    files: list[str]
    samples: dict
    requested: int
    indices: list[int]                  # the sample index of each file (its seed and prompt), gaps possible


def _plan(e: EvalSection, requested: int, run: RunDir, models: Sequence[str], allow_fewer: bool) -> list[_Job]:
    """Check every model's samples before any heavy work; bad input is a UsageError."""
    from ..engine.model_specs import parse_model_spec
    from ..engine.images import SAMPLES_JSON, existing_images

    jobs = []
    for m in models:
        parse_model_spec(m)
        folder = run.samples(m)
        have = existing_images(folder)
        if not have:
            raise UsageError(f"no samples for model '{m}' in '{folder}'; run 'deme sample RECIPE --model {m}' first")
        idx = sorted(k for k in have if k < requested)
        meta = read_record(folder / SAMPLES_JSON, f"run 'deme sample RECIPE --model {m} --force' to make the samples "
                                                  f"again") if (folder / SAMPLES_JSON).is_file() else {}
        if len(idx) < requested and not allow_fewer and meta.get("complete") is False:
            raise UsageError(f"the samples of '{m}' are incomplete ({len(idx)} of {requested} images: a 'deme "
                             f"sample' was stopped); run 'deme sample RECIPE --model {m}' to finish them, or pass "
                             f"--allow-fewer")
        if len(idx) < requested and not allow_fewer:
            raise UsageError(f"'{folder}' holds {len(idx)} of the {requested} images to score; run 'deme sample' "
                             f"with sample.num_images = {requested}, or pass --allow-fewer")
        if not idx:
            raise UsageError(f"'{folder}' holds no images numbered below {requested}")
        if "clip" in e.metrics:
            prompts = meta.get("prompts")
            if not prompts or len(prompts) <= idx[-1]:
                raise UsageError(f"CLIP score needs the prompts of model '{m}''s samples, but its samples.json has "
                                 f"none; remove \"clip\" from eval.metrics for unconditional models")
        jobs.append(_Job(m, folder, [str(have[k]) for k in idx], meta, requested, idx))
    return jobs


def _old_result(path: Path) -> dict:
    """eval/<model>.json as written before; a damaged one counts as none (it is scored again)."""
    try:
        return read_json(path) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


def _fingerprint(job: _Job, e: EvalSection, seed: int, reference: Optional[str],
                 extractor_id: Optional[str]) -> Optional[str]:
    """Inputs that determine an eval result; None when they cannot be pinned down (then it is always recomputed)."""
    if extractor_id is None and any(m in e.metrics for m in ("fid", "kid")):
        return None
    ref_id: Any = reference
    if reference and Path(reference).expanduser().exists():
        p = Path(reference).expanduser()
        ref_id = _file_key(p) if p.is_file() else [_file_key(Path(f)) for f in image_files(p)]
    # samples.json is rewritten by every `deme sample` call; its per-call bookkeeping says nothing about the images, so
    # it is left out (freshness.samples_key): otherwise re-running `deme run` re-scores every model once
    blob = {"samples": freshness.samples_key(job.samples, job.files),
            # each image by its name, size and mtime, not its absolute path: a run moved elsewhere (times kept) is not
            # scored again
            "files": [[Path(f).name, Path(f).stat().st_size, Path(f).stat().st_mtime_ns] for f in job.files],
            "reference": ref_id, "extractor": extractor_id,
            "mode": e.mode, "metrics": [m for m in e.metrics if m in SAMPLE_METRICS],
            "clip": e.clip_model,
            "seed": seed}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


SAMPLE_METRICS = ("fid", "kid", "clip")          # scored on sample folders; "loss" needs no samples (loss_by_t.py)


def run_eval(recipe, run: RunDir, models: Sequence[str], allow_fewer: bool = False, force: bool = False,
             extractor: Optional[FeatureExtractor] = None) -> dict:
    """`deme eval RECIPE --models ...` for a recipe."""
    return evaluate(resolve_base(recipe.model, recipe.train.device), run, models, allow_fewer=allow_fewer,
                    force=force, extractor=extractor, **stage_kwargs(evaluate, recipe))


def evaluate(base: Base,                           # the base: the loss ratio's denominator, the device
             run: RunDir,                          # the run directory: samples/ and models in, eval/ out
             models: Sequence[str],                # model specs to score
             *,
             eval: EvalSection,                    # metrics, reference, mode, feature extractor, CLIP, loss bins
             sample: SampleSection,                # sample.num_images: the default of eval.num_images
             data: DataSection,                    # loss: data.resolution and how the reference folder is read
             ranges: RangesSection,                # loss: the range models of range:I and ensemble
             merge: MergeSection,                  # loss: merge.use_ema, their EMA or raw weights
             seed: int,                            # KID's subsets
             name: str,                            # the recipe name on the loss plot
             allow_fewer: bool = False,            # score fewer images than asked for
             force: bool = False,                  # recompute results whose inputs did not change
             extractor: Optional[FeatureExtractor] = None,  # overrides eval.feature_extractor (tests)
             ) -> dict:
    """Score each model; writes run.eval_json(model). FID / KID / CLIP score need the model's samples; "loss"
    (loss_by_t.py) needs only the models. A model's JSON keeps the parts not asked for this time (each carries its own
    fingerprint)."""
    from ..engine import loss_by_t, ui
    from ..engine.model_specs import check_model_spec, spec_settings

    e = eval
    if e.mode not in MODES:
        raise UsageError(f"unknown eval.mode '{e.mode}' (known: {', '.join(MODES)})")
    for m in models:
        check_model_spec(m, ranges.n)
    need_ref = any(m in e.metrics for m in ("fid", "kid"))
    want_samples = any(m in e.metrics for m in SAMPLE_METRICS)
    want_loss = "loss" in e.metrics
    if need_ref:
        reference_kind(e.reference)
    if want_loss:
        loss_by_t.check_reference(e)
    jobs = _plan(e, e.num_images or sample.num_images, run, models, allow_fewer) if want_samples else []
    device = base.device
    # the networks (the Inception, CLIP) are loaded only once a model needs scoring: an up-to-date re-run loads none
    ext_id = (extractor.cache_key if extractor is not None else extractor_key(e.feature_extractor, e.mode)) \
        if need_ref else None
    clip = None
    old = {m: _old_result(run.eval_json(m)) for m in models}
    fps = {job.model: _fingerprint(job, e, seed, e.reference if need_ref else None, ext_id) for job in jobs}
    folders = {m: freshness.model_folders(run, m, base.folder, merge.use_ema, ranges.n) for m in models}
    made = {job.model: _made_by(job, run, folders[job.model], old[job.model].get("model_files")) for job in jobs}
    same = {job.model: not force and fps[job.model] is not None and old[job.model].get("fingerprint") == fps[job.model]
            for job in jobs}
    todo = [job for job in jobs if not (same[job.model] and _recorded(old[job.model], made[job.model]))]
    _check_made_by_now(base, run, todo, spec_settings(ranges, merge, data))    # refuses before anything is written
    for job in todo:        # the images to score can be read, before any network or reference is loaded
        if not same[job.model]:
            check_readable(job.files)

    ref = None
    results, scored = {m: dict(old[m]) for m in models}, []     # scored: the models computed now, not reused
    recorded = []           # reused results that now also record what they scored (written, not scored)
    for job in jobs:
        fp = fps[job.model]
        if same[job.model]:
            ui.info(f"eval {job.model}: up to date ({run.eval_json(job.model)}); --force recomputes it")
            if any(old[job.model].get(k) != v for k, v in made[job.model].items()):   # new, or files' times moved
                results[job.model].update(made[job.model])
                recorded.append(job.model)
            continue
        if extractor is None:
            extractor = load_extractor(e.feature_extractor, e.mode, device) if need_ref \
                else FeatureExtractor(lambda x: x, "none")
        if clip is None and "clip" in e.metrics:
            clip = load_clip(e.clip_model, device)
        t0 = time.time()
        values: dict = {}
        notes: list = []
        if need_ref:
            if ref is None:
                from PIL import Image

                res = Image.open(job.files[0]).size[0]
                ref = load_reference(e.reference, extractor, e.mode, res=res, split=e.reference_split,
                                     batch_size=e.batch_size, device=device, cache_dir=run.root / "eval" / "cache",
                                     want_feats="kid" in e.metrics)
            feats = files_features(job.files, extractor, e.mode, e.batch_size, device)
            values, notes = score_features(feats, ref, e.metrics, seed)
        if clip is not None:
            prompts = [job.samples["prompts"][k] for k in job.indices]     # image k was made from prompt k
            values["clip_score"] = clip_score(job.files, prompts, clip, device, e.batch_size)
        s = job.samples
        # the sample part is replaced whole; a loss_by_t scored earlier keeps its own fingerprint
        results[job.model] = {k: v for k, v in old[job.model].items() if k == "loss_by_t"}
        results[job.model].update({
            "model": job.model, "metrics": values, "backend": BACKEND, "backend_version": _version("clean-fid"),
            "mode": e.mode, "feature_extractor": extractor.info if need_ref else None,
            "clip_model": e.clip_model if clip is not None else None,
            "num_images": len(job.files), "num_images_requested": job.requested,
            "reference": ref.describe() if ref is not None else None,
            "samples": str(job.folder), "seeds": s.get("seeds"),
            "sampler": {k: s.get(k) for k in ("scheduler", "steps", "eta", "precision", "batch_size")
                        + (("guidance_scale", "negative_prompt", "prompt_source") if "prompts" in s else ())},
            "model_hash": (s.get("settings") or {}).get("model_hash"), "kid_seed": seed, "notes": notes,
            "time_s": round(time.time() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "fingerprint": fp, **made[job.model],
        })
        for n in notes:
            ui.warn(n)
        scored.append(job.model)
    loss_plot = None
    if want_loss:
        records = loss_by_t.score(base, run, models, device,
                                  {m: old[m].get("loss_by_t") for m in models if old[m].get("loss_by_t")}, force,
                                  ev=e, data=data, specs=spec_settings(ranges, merge, data))
        for m in models:
            if records[m] is not (old[m].get("loss_by_t")) and m not in scored:
                scored.append(m)
            results[m]["loss_by_t"] = records[m]
        loss_plot = loss_by_t.plot(run, records, name)
    for m in models:
        r = results[m]
        r.setdefault("model", m)
        metrics = {k: v for k, v in (r.get("metrics") or {}).items() if k != "loss_ratio"}
        if r.get("loss_by_t"):
            metrics["loss_ratio"] = r["loss_by_t"]["ratio_mean"]
        r["metrics"] = metrics
        if m in scored or m in recorded:
            write_json(run.eval_json(m), r)
    model_card.update(run, base, models)                 # the results in the cards of merged/ and range folders
    shown = {m: freshness.current(run, {**results[m], "model": m}) for m in models}   # only what is current
    return {"reference": e.reference, "mode": e.mode, "results": {m: r for m, (r, _) in shown.items()},
            "stale": {m: {part: {"why": v.why, "command": v.command} for part, v in st.items()}
                      for m, (_, st) in shown.items() if st},
            "scored": scored, **({"loss_plot": loss_plot} if loss_plot else {})}


def _made_by(job: _Job, run: RunDir, folders: list[Path], previous: Optional[dict]) -> dict:
    """What a result of the samples scores records about them (freshness.py): the samples' identity and the files of
    the model folders they were made from (none for images deme did not make: no model hash ties them to a model)."""
    made_by_deme = (job.samples.get("settings") or {}).get("model_hash") is not None
    return {"samples_key": freshness.samples_key(job.samples, job.files),
            "model_files": freshness.signature(folders, run.root, previous) if made_by_deme else {}}


def _recorded(prev: dict, made: dict) -> bool:
    """The earlier result records these samples and these model files (same content)."""
    def content(sig: dict) -> dict:
        return {k: {f: v[2] for f, v in files.items()} for k, files in (sig or {}).items()}

    return prev.get("samples_key") == made["samples_key"] and \
        content(prev.get("model_files")) == content(made["model_files"])


def _check_made_by_now(base: Base, run: RunDir, jobs: Sequence[_Job], specs: dict) -> None:
    """Refuse (UsageError) samples that another model made than the one on disk now (merged or trained again since):
    their scores would be shown as this model's. Loads each model once for its hash."""
    import torch

    from ..engine.model_specs import load_unets

    for job in jobs:
        made_by = (job.samples.get("settings") or {}).get("model_hash")
        if made_by is None:                 # images deme did not make (no samples.json): nothing to compare
            continue
        now = load_unets(base, run, job.model, torch.device("cpu"), **specs).identity.get("hash")
        if now != made_by:
            raise UsageError(f"the samples in '{job.folder}' were made by another {job.model} model than the one on "
                             f"disk now (it was merged or trained again since); run 'deme sample RECIPE --model "
                             f"{job.model} --force' to sample it again")


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None
