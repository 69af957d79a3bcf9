"""`deme train`: decoupled finetuning of one copy of the pretrained model per timestep range (paper section 3.2).

Range i trains a student (the pretrained UNet with identity-initialised channel-wise projections) on

    L_i = ||eps - eps_theta_i(x_t, t)||^2 + lambda * ||eps_theta(x_t, t) - eps_theta_i(x_t, t)||^2        (Eq. 5)

where eps_theta is the frozen pretrained teacher, evaluated on the same x_t and t, and t is drawn by Eq. 6 (with
probability p from all of [0, T), else from the range). AdamW, an LR schedule, gradient accumulation, grad-norm
clipping and an EMA with the release's warm-up; accelerate places the models and runs mixed precision and DDP.

Outputs per range (runs.RunDir): checkpoints/step-<k>/ + checkpoints/latest (see checkpoints.py), metrics.jsonl (one
line per optimizer step; also sent to train.log_with's tracker, whose files go to logs/: tracking.py), previews/
(a grid of EMA samples every train.preview_every steps: previews.py), final/ (EMA weights, or raw when train.ema =
false), final-raw/ (raw weights), recipe.resolved.toml. Re-running continues from the newest intact checkpoint; a
finished range is skipped unless forced, and refused when it was made from other recipe values (its deme.json
records them: provenance.py). One process at a time trains a range (locks.py). SIGTERM, SIGINT and SIGUSR1 stop at
the next step boundary after a checkpoint (interrupts.py); one that comes during the last step or its checkpoint stops
before the export (the re-run only exports), one during the export stops once it is written, and no next range
starts; a NaN or infinite loss, grad norm or weight stops training
with exit 1, keeping the last good checkpoint.

The stage is `train_ranges(base, run, data=..., ranges=..., train=..., deme=..., seed=..., name=...)`; `run_train`
resolves the base of a recipe and calls it (the CLI and tests). The per-range state and one optimizer step live in
the engine (trainer.py, loss.py).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Optional

from ..engine import (adapters, checkpoints, environment, exports, interrupts, locks, model_card, preflight,
                      provenance, tracking, ui)
from ..engine.base import Base, resolve_base
from ..engine.errors import Failed, UsageError
from ..engine.models import read_meta, unet_folder
from ..engine.ranges import Range
from ..engine.previews import PREVIEW_DIR, Previews
from ..engine.recipe import DataSection, DemeSection, RangesSection, SampleSection, TrainSection, stage_kwargs
from ..engine.runs import RunDir, write_atomic
from ..engine.splitting import load_ranges
from ..engine.trainer import RangeTrainer


def run_train(recipe, run: RunDir, index: Optional[int] = None, force: bool = False) -> list[dict]:
    """`deme train RECIPE --range I` (or every range when `index` is None) for a recipe."""
    base = resolve_base(recipe.model, recipe.train.device)
    return train_ranges(base, run, index=index, force=force, resolved=recipe.to_toml(), preview_sample=recipe.sample,
                        **stage_kwargs(train_ranges, recipe))


def train_ranges(base: Base,                       # the pretrained model; its precision becomes train.mixed_precision
                 run: RunDir,                      # the run directory: ranges.json in, ranges/<i>/ out
                 *,
                 data: DataSection,                # the training images (and captions)
                 ranges: RangesSection,            # N, and how ranges.json is computed when missing
                 train: TrainSection,              # optimizer, schedule, EMA, checkpoints, precision, compile
                 deme: DemeSection,                # p (Eq. 6), consistency weight (Eq. 5), projections
                 seed: int,                        # data order, timestep and noise generators
                 name: str,                        # the recipe name each range model records
                 index: Optional[int] = None,      # the range to train; None: every range, one after another
                 force: bool = False,              # start over instead of resuming or skipping a finished range
                 resolved: str = "",               # the resolved recipe (TOML) each range records
                 preview_sample: Optional[SampleSection] = None,  # [sample]: prompts and guidance of text-to-image
                                                   # previews (train.preview_every); not an input of the range model
                 ) -> list[dict]:
    """Train range `index` (or every range), resuming from checkpoints; returns one summary per range."""
    n = ranges.n
    if index is not None and not 0 <= index < n:
        raise UsageError(f"range {index} does not exist: the recipe has ranges.n = {n}, so --range takes 0 to {n - 1}")
    base = base.with_precision(train.mixed_precision)
    check_training_needs(base, run, data=data, ranges=ranges, train=train, deme=deme, index=index, force=force,
                         preview_sample=preview_sample)
    chosen = load_ranges(base, ranges, run)
    chosen = chosen if index is None else [chosen[index]]
    return [train_range(base, run, r, data=data, ranges=ranges, train=train, deme=deme, seed=seed, name=name,
                        force=force, resolved=resolved, preview_sample=preview_sample) for r in chosen]


def check_training_needs(base: Base, run: RunDir, *, data: DataSection, ranges: RangesSection, train: TrainSection,
                         deme: Optional[DemeSection] = None, index: Optional[int] = None, force: bool = False,
                         preview_sample: Optional[SampleSection] = None) -> None:
    """What training range `index` (None: every range) will need, checked before any model is loaded and, in a new
    run, before ranges.json is written (preflight.py): the data, the disk for the ranges not finished yet, the
    tracker's package (train.log_with) and the prompts of text-to-image previews."""
    if run.ranges_json.is_file():
        chosen = load_ranges(base, ranges, run)
        left = sum(force or trained_meta(train, run, r) is None for r in (chosen if index is None else [chosen[index]]))
    else:
        left = ranges.n if index is None else 1
    if left:
        preflight.check_data(data, base.kind.conditional)
        preflight.check_disk(run.root, base, train, left, deme)
        if deme is not None:
            adapters.check_targets(unet_folder(base.folder), deme)
        tracking.check_tracker(train.log_with)
        if train.preview_every and preview_sample is not None and preview_sample.prompts:
            preflight.check_prompts(preview_sample, base.kind.conditional)


def _summary(r: Range, steps: int, loss: Optional[float], final: Path, skipped: bool) -> dict:
    return {"range": r.index, "lo": r.lo, "hi": r.hi, "steps": steps, "loss": loss, "final": str(final),
            "skipped": skipped}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step` (written after the checkpoint we resume from), so steps are never repeated."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    if keep != lines:
        write_atomic(path, "".join(x + "\n" for x in keep))


def _recent_loss(path: Path, n: int = 10) -> Optional[float]:
    """Mean total loss over the last n logged steps."""
    if not path.is_file():
        return None
    vals = []
    for line in path.read_text().splitlines()[-n:]:
        try:
            vals.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return sum(vals) / len(vals) if vals else None


def trained_meta(train: TrainSection, run: RunDir, r: Range) -> Optional[dict]:
    """deme.json of range r's final model when it is finished for these settings (train.steps, same [lo, hi)), else
    None. A finished final/ is enough: its checkpoints are not read (nor verified). Raises UsageError when an
    unfinished range's checkpoint to resume from is past train.steps.
    """
    tr = train
    if run.final(r.index).is_dir():
        meta = read_meta(run.final(r.index))
        if meta.get("steps") == tr.steps and meta.get("range", {}).get("lo") == r.lo \
                and meta.get("range", {}).get("hi") == r.hi:
            return meta
    resume = checkpoints.latest(run.checkpoints(r.index))
    resume_step = int(json.loads((resume / "state.json").read_text())["step"]) if resume else 0
    if resume_step > tr.steps:
        raise UsageError(f"range {r.index} already has a checkpoint at step {resume_step}, past train.steps = "
                         f"{tr.steps}; raise train.steps or start over with --force")
    return None


def finished_meta(train: TrainSection, run: RunDir, r: Range, inputs: dict) -> Optional[dict]:
    """trained_meta, refusing (UsageError) a finished range made from recipe values other than `inputs`
    (range_inputs)."""
    meta = trained_meta(train, run, r)
    if meta is not None:
        provenance.refuse_changed(f"range {r.index} in '{run.root}'", meta.get("inputs"), inputs)
    return meta


def reexport_if_stale(run: RunDir, r: Range, base: Base) -> bool:
    """Re-export a finished range's final/ that was exported before the EMA fix (exports.py) from its last
    checkpoint, or rewrite final/ and final-raw/ of the older folder layout as pipeline folders
    (exports.upgrade), saying so in one line; True when it did. UsageError when no checkpoint is left to
    re-export from."""
    # under accelerate launch only the main process rewrites the folder; the others see it finished
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    if exports.is_stale(run.final(r.index)):
        ck = exports.reexport(run, r.index, base.folder)
        ui.info(f"range {r.index}: final/ held the raw weights (exported before the EMA fix); re-exported the EMA "
                f"weights from checkpoints/{ck.name} without training")
        return True
    upgraded = [f.name for f in (run.final(r.index), run.final(r.index, ema=False))
                if f.is_dir() and exports.upgrade(f, base.folder)]
    if upgraded:
        ui.info(f"range {r.index}: rewrote {' and '.join(upgraded)} as diffusers pipeline folders (the same weights; "
                f"deme's older folder layout), without training")
    return bool(upgraded)


def range_inputs(*, data: DataSection, ranges: RangesSection, train: TrainSection, deme: DemeSection,
                 seed: int) -> dict:
    """The recipe values that shape a range model (provenance.inputs), recorded in its deme.json. train.steps is left
    out: a finished range with more train.steps continues from its checkpoint (`trained_meta`)."""
    return provenance.inputs(drop=("train.steps",), data=data, ranges=ranges, train=train, deme=deme, seed=seed)


def _is_finite(x) -> bool:
    return x is None or math.isfinite(x)


def _check_finite(r: Range, line: dict, ckpt_dir: Path, lr: float, scaled: bool) -> None:
    """Failed (exit 1) naming the step and the last good checkpoint when a loss or the grad norm is NaN or inf.
    `scaled`: fp16 with a gradient scaler, which skips steps with infinite gradients itself (not a divergence)."""
    keys = ("loss", "denoise_loss", "consistency_loss") + (() if scaled else ("grad_norm",))
    bad = [k for k in keys if not _is_finite(line.get(k))]
    if bad:
        _diverged(r, line["step"], f"{bad[0]} is {line[bad[0]]}", ckpt_dir, lr)


def _diverged(r: Range, step: int, what: str, ckpt_dir: Path, lr: float) -> None:
    pointer = ckpt_dir / checkpoints.LATEST
    kept = pointer.read_text().strip() if pointer.is_file() else None
    keep = (f"the last good checkpoint, {ckpt_dir / kept}, is kept" if kept else
            "no checkpoint was written before it")
    raise Failed(f"range {r.index} diverged: the {what} at step {step} (train.lr = {lr:g}); training stopped and "
                 f"{keep}; lower train.lr or train.max_grad_norm and re-run with --force")


def _json_line(line: dict) -> str:
    """A metrics line as strict JSON: NaN and infinities become null (they are reported, not recorded)."""
    return json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()},
                      allow_nan=False)


def train_range(base: Base, run: RunDir, r: Range, *, data: DataSection, ranges: RangesSection, train: TrainSection,
                deme: DemeSection, seed: int, name: str, force: bool = False, resolved: str = "",
                preview_sample: Optional[SampleSection] = None) -> dict:
    """DeMe-finetune one range (see the module docstring); resumes from its latest checkpoint. One process at a time
    trains a range (locks.py); a finished range made from other recipe values is refused, not skipped."""
    main = int(os.environ.get("RANK", "0")) == 0
    inputs = range_inputs(data=data, ranges=ranges, train=train, deme=deme, seed=seed)
    with locks.hold(run.range_dir(r.index) / locks.LOCK_NAME, f"range {r.index} of '{run.root}'", main=main):
        return _train_range(base, run, r, inputs, data=data, train=train, deme=deme, seed=seed, name=name,
                            force=force, resolved=resolved, preview_sample=preview_sample)


def _train_range(base: Base, run: RunDir, r: Range, inputs: dict, *, data: DataSection, train: TrainSection,
                 deme: DemeSection, seed: int, name: str, force: bool, resolved: str,
                 preview_sample: Optional[SampleSection] = None) -> dict:
    tr = train
    rdir, ckpt_dir, metrics = run.range_dir(r.index), run.checkpoints(r.index), run.metrics(r.index)

    # Start over, or skip a finished range (refused when it was made from other recipe values).
    if force:
        for p in (ckpt_dir, run.final(r.index), run.final(r.index, ema=False)):
            shutil.rmtree(p, ignore_errors=True)
        metrics.unlink(missing_ok=True)
    meta = finished_meta(train, run, r, inputs)
    if meta is not None:
        if not reexport_if_stale(run, r, base):
            ui.info(f"range {r.index} is already trained for {tr.steps} steps ({run.final(r.index)}); "
                    f"use --force to train it again")
        return _summary(r, tr.steps, meta.get("loss"), run.final(r.index), skipped=True)
    resume = checkpoints.latest(ckpt_dir)
    if resume is not None and run.final(r.index).is_dir():
        # continuing a finished range to more steps: it must have been made from the same values
        provenance.refuse_changed(f"range {r.index} in '{run.root}'", read_meta(run.final(r.index)).get("inputs"),
                                  inputs)

    # Build the trainer, resume, train, export; the data workers stop with the range, however it ends.
    trainer = RangeTrainer(base, r, data=data, train=train, deme=deme, seed=seed, cache_dir=run.cache,
                           logs_dir=rdir / tracking.LOGS_DIR)
    with closing(trainer):
        main = trainer.acc.is_main_process
        if resume is not None:
            trainer.load_checkpoint(resume)
            if main:
                ui.info(f"range {r.index}: resuming from {resume.name}")
        if main:
            rdir.mkdir(parents=True, exist_ok=True)
            if resolved:
                write_atomic(rdir / "recipe.resolved.toml", resolved)
            _truncate_metrics(metrics, trainer.step)
        # Train, with the tracker's run open and the preview grids of the main process.
        previews = None if not (main and tr.preview_every) else Previews(
            base, trainer, train=tr, sample=preview_sample or SampleSection(), seed=seed, resolution=data.resolution,
            folder=rdir / PREVIEW_DIR)
        # A signal from here on stops the range at its next safe point (interrupts.py), never lost: after a step
        # (with a checkpoint), after the last step's checkpoint (before the export), or after the export.
        with interrupts.deferred() as stop:
            with tracking.started(trainer.acc, name, f"range-{r.index}",
                                  {**inputs, "range.lo": r.lo, "range.hi": r.hi}, trainer.step):
                _fit(trainer, r, tr, ckpt_dir, metrics, main, stop, previews)
            if trainer.any_process(stop.signum is not None):   # it came during the last step or its checkpoint:
                # the export (for Stable Diffusion, GBs) is left to the re-run, which resumes there and only exports
                raise interrupts.Interrupted(stop.signum or signal.SIGTERM, (
                    f"range {r.index} stopped by {_signal_name(stop)} after its last step ({trainer.step} of "
                    f"{tr.steps}); checkpoint written to {ckpt_dir / checkpoints.step_dirname(trainer.step)}; re-run "
                    f"the same command to write final/ from it"))

            # Save the final models: EMA (or raw) in final/, raw in final-raw/.
            loss = _recent_loss(metrics) if main else None
            if main:
                raw, ema = trainer.final_states()
                meta = {"range": r.as_dict(), "T": base.T, "steps": trainer.step, "base_hash": trainer.base_hash,
                        "recipe": name, "ema": ema is not None, "projection": deme.projection,
                        "deme": deme.model_dump(), "loss": loss, "inputs": inputs,
                        "environment": environment.describe()}
                trainer.export(run.final(r.index, ema=False), {**meta, "weights": "raw"}, raw, base.folder)
                trainer.export(run.final(r.index), {**meta, "weights": "ema" if ema is not None else "raw"},
                               ema if ema is not None else raw, base.folder)
                model_card.update(run, base, [f"range:{r.index}"])     # README.md of final/ and final-raw/
            trainer.acc.wait_for_everyone()
            if trainer.any_process(stop.signum is not None):   # it came during the export: that is finished
                raise interrupts.Interrupted(stop.signum or signal.SIGTERM, (
                    f"range {r.index} finished ({run.final(r.index)} written) and stopped by {_signal_name(stop)} "
                    f"before anything after it; re-run the same command to continue"))
    return _summary(r, trainer.step, loss, run.final(r.index), skipped=False)


def _signal_name(stop: interrupts.StopFlag) -> str:
    return stop.name or "a signal to another process"


def _fit(trainer: RangeTrainer, r: Range, tr: TrainSection, ckpt_dir: Path, metrics: Path, main: bool,
         stop: interrupts.StopFlag, previews: Optional[Previews] = None) -> None:
    """Train to tr.steps, logging every step (metrics.jsonl, with the seconds since this process started training:
    elapsed_s; and the tracker), previewing every tr.preview_every (the
    main process; the others wait) and checkpointing every tr.checkpoint_every. A signal (`stop`, set inside
    interrupts.deferred) stops at the next step boundary, after a checkpoint of that step; one that comes after the
    last step's boundary is the caller's to act on. A NaN or infinite loss or grad norm, or weights that overflowed,
    stop without writing a checkpoint (the last good one is kept)."""
    desc = f"range {r.index} [{r.lo}, {r.hi})"
    with (ui.progress(desc, total=tr.steps, start=trainer.step, unit="step", every=tr.log_every) if main
          else nullcontext()) as bar, \
            (open(metrics, "a") if main else nullcontext()) as log:
        def record(pending) -> None:
            line = {**pending(), "elapsed_s": round(time.time() - t0, 3)}
            if main:
                log.write(_json_line(line) + "\n")
                log.flush()
                tracking.log_line(trainer.acc, line)
                bar.update(1, loss=line["loss"], cons=line["consistency_loss"], lr=line["lr"])
            _check_finite(r, line, ckpt_dir, tr.lr, scaled=trainer.acc.scaler is not None)

        pending = None          # the step whose metrics are not read yet (read after queuing the next one)
        t0 = time.time()
        while trainer.step < tr.steps:
            try:
                queued = trainer.launch_step()
            except RuntimeError as e:     # AdamW's step size past the float range (train.lr = 1e38)
                if "overflow" not in str(e):
                    raise
                _diverged(r, trainer.step + 1, "optimizer update overflowed", ckpt_dir, tr.lr)
            if pending is not None:
                record(pending)
            pending = queued
            if tr.preview_every and trainer.step % tr.preview_every == 0:
                if previews is not None:
                    previews.write(trainer.step)
                trainer.acc.wait_for_everyone()
            stopping = trainer.any_process(stop.signum is not None)
            if trainer.step % tr.checkpoint_every == 0 or trainer.step == tr.steps or stopping:
                record(pending)  # a checkpoint at step k comes after metric line k (resume truncates past it)
                pending = None
                if not trainer.weights_finite():
                    _diverged(r, trainer.step, "weights became NaN or infinite", ckpt_dir, tr.lr)
                if stopping:
                    trainer.close()    # the data workers end now, not by their SIGTERM grace during the save
                trainer.save_checkpoint(ckpt_dir)
                if stopping:
                    saved = ckpt_dir / checkpoints.step_dirname(trainer.step)
                    raise interrupts.Interrupted(stop.signum or signal.SIGTERM, (
                        f"range {r.index} stopped by {_signal_name(stop)} at step "
                        f"{trainer.step} of {tr.steps}; checkpoint written to {saved}; re-run the same command to "
                        f"resume from it"))
