"""`deme train`: decoupled finetuning of one copy of the pretrained model per timestep range (paper section 3.2).

Range i trains a student (the pretrained UNet with identity-initialised channel-wise projections) on

    L_i = ||eps - eps_theta_i(x_t, t)||^2 + lambda * ||eps_theta(x_t, t) - eps_theta_i(x_t, t)||^2        (Eq. 5)

where eps_theta is the frozen pretrained teacher, evaluated on the same x_t and t, and t is drawn by Eq. 6 (with
probability p from all of [0, T), else from the range). AdamW, an LR schedule, gradient accumulation, grad-norm
clipping and an EMA with the release's warm-up; accelerate places the models and runs mixed precision and DDP.

Outputs per range (runs.RunDir): checkpoints/step-<k>/ + checkpoints/latest (see checkpoints.py), metrics.jsonl (one
line per optimizer step), final/ (EMA weights, or raw when train.ema = false), final-raw/ (raw weights),
recipe.resolved.toml. Re-running continues from `latest`; a finished range is skipped unless forced.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Optional

from . import checkpoints, exports, ui
from .captions import TextToImageTask
from .data import EpochBatches, build_dataset
from .errors import UsageError
from .models import (is_text_to_image, load_unet, num_train_timesteps, read_meta, resolve_pretrained,
                     save_model_folder, scheduler_config, unet_hash, wrap)
from .ranges import Range, sample_timesteps
from .runs import RunDir, write_atomic
from .speed import compile_module, to_device, use_compile
from .splitting import load_ranges

LR_SCHEDULES = {  # recipe name -> diffusers.optimization.get_scheduler name (all honour lr_warmup_steps)
    "constant": "constant_with_warmup",
    "cosine": "cosine",
    "linear": "linear",
}


# --- the task: what a batch is and what the UNet takes besides (x_t, t) ---------------------------------------------

class UnconditionalTask:
    """Pixel-space unconditional DDPM: a batch is images; x0 = the images, no extra UNet inputs."""

    name = "unconditional"

    def __init__(self, recipe, pipeline_dir: Path, unet, device):
        self.recipe, self.device, self.channels = recipe, device, int(unet.config.in_channels)

    def dataset(self):
        return build_dataset(self.recipe, channels=self.channels)

    def prepare(self, batch) -> tuple[Any, dict]:
        """batch -> (x0 on the device, extra keyword arguments of the UNet call)."""
        return batch.to(self.device, non_blocking=True), {}


TASKS: dict[str, type] = {"unconditional": UnconditionalTask, "text_to_image": TextToImageTask}


def make_task(recipe, pipeline_dir: Path, unet, device):
    kind = "text_to_image" if is_text_to_image(pipeline_dir) else "unconditional"
    if kind not in TASKS:
        raise UsageError(f"training a {kind.replace('_', '-')} model ({unet.__class__.__name__}) is not yet available "
                         f"in this version")
    return TASKS[kind](recipe, pipeline_dir, unet, device)


# --- the loss (Eq. 5) and one optimizer step ---------------------------------------------------------------------

TARGETS = {  # scheduler prediction_type -> what the UNet should predict
    "epsilon": lambda sched, x0, noise, t: noise,
    "v_prediction": lambda sched, x0, noise, t: sched.get_velocity(x0, noise, t),
    "sample": lambda sched, x0, noise, t: x0,
}


def noisy_and_target(noise_scheduler, x0, noise, t):
    """(x_t, what the UNet should predict for it) under the scheduler's prediction_type."""
    x_t = noise_scheduler.add_noise(x0, noise, t)
    return x_t, TARGETS[noise_scheduler.config.prediction_type](noise_scheduler, x0, noise, t)


def deme_loss(student, teacher, noise_scheduler, x0, noise, t, unet_kwargs: dict, consistency_weight: float,
              autocast=nullcontext):
    """Eq. 5 on one micro-batch: (loss, denoising loss, consistency loss or None), mean squared errors per element.

    The teacher (the frozen pretrained UNet, or None to skip it) sees the same x_t and t as the student; it runs
    under inference mode, and its output is a constant target.
    """
    import torch
    import torch.nn.functional as F

    x_t, target = noisy_and_target(noise_scheduler, x0, noise, t)
    with autocast():
        pred = student(x_t, t, **unet_kwargs).sample
        if teacher is not None:
            with torch.inference_mode():
                pred_teacher = teacher(x_t, t, **unet_kwargs).sample
    pred = pred.float()
    denoise = F.mse_loss(pred, target.float())
    if teacher is None:
        return denoise, denoise.detach(), None
    # the subtraction saves nothing for backward, so the inference-mode tensor may enter the graph here
    consistency = (pred - pred_teacher.float()).pow(2).mean()
    return denoise + consistency_weight * consistency, denoise.detach(), consistency.detach()


def optimizer_step(acc, student, teacher, optimizer, params: list, noise_scheduler, micro_batches: Iterable,
                   n_micro: int, consistency_weight: float, max_grad_norm: float) -> dict:
    """Accumulate the gradients of `n_micro` micro-batches (x0, unet_kwargs, t, noise), clip, and step AdamW.

    Returns device tensors: loss, denoise_loss, consistency_loss (None without teacher), grad_norm (before clipping).
    """
    total = {"loss": 0.0, "denoise_loss": 0.0, "consistency_loss": None if teacher is None else 0.0}
    for j, (x0, kwargs, t, noise) in enumerate(micro_batches):
        sync = j == n_micro - 1 or acc.num_processes == 1
        with nullcontext() if sync else acc.no_sync(student):
            loss, denoise, consistency = deme_loss(student, teacher, noise_scheduler, x0, noise, t, kwargs,
                                                   consistency_weight, acc.autocast)
            acc.backward(loss / n_micro)
        total["loss"] += loss.detach() / n_micro
        total["denoise_loss"] += denoise / n_micro
        if consistency is not None:
            total["consistency_loss"] += consistency / n_micro
    # max_norm = inf measures the norm without changing the gradients (clip coefficient clamps to 1)
    total["grad_norm"] = acc.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --- EMA ---------------------------------------------------------------------------------------------------------

def ema_decay(k: int, max_decay: float, power: float) -> float:
    """Decay of EMA update k (0-based): min(max_decay, 1 - (1 + k)^-power); update 0 copies the weights."""
    return min(max_decay, 1.0 - (1.0 + k) ** -power)


class EMA:
    """Exponential moving average of named parameters (the student's UNet and projections), in fp32."""

    def __init__(self, named_params: list, max_decay: float, power: float):
        self.names = [n for n, _ in named_params]
        self.shadow = [p.detach().float().clone() for _, p in named_params]
        self.max_decay, self.power, self.updates = max_decay, power, 0

    def update(self, params: list) -> None:
        import torch

        d = ema_decay(self.updates, self.max_decay, self.power)
        with torch.no_grad():
            current = [p.detach().float() for p in params]
            if d == 0.0:
                torch._foreach_copy_(self.shadow, current)
            else:
                torch._foreach_lerp_(self.shadow, current, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict, updates: int) -> None:
        import torch

        missing = set(self.names) - set(state)
        if missing:
            raise UsageError(f"the checkpoint's EMA lacks {len(missing)} weights (e.g. {sorted(missing)[0]}); start "
                             f"the range over with --force")
        with torch.no_grad():
            for s, n in zip(self.shadow, self.names):
                s.copy_(state[n])
        self.updates = updates


# --- devices and precision ---------------------------------------------------------------------------------------

def make_accelerator(train):
    """An accelerate Accelerator for train.device and train.mixed_precision (auto: bf16 on CUDA, fp32 on CPU)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    if train.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("train.device is 'cuda' but no CUDA device is available; set train.device = \"auto\" or "
                         "\"cpu\"")
    cpu = train.device == "cpu" or not torch.cuda.is_available()
    mp = train.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    if cpu and mp != "no":
        ui.warn(f"mixed_precision = {mp} on the CPU is slow (often ~10x); train.mixed_precision = \"no\" is faster")
    try:
        return Accelerator(mixed_precision=mp, cpu=cpu)
    except ValueError as e:
        # accelerate keeps one state per process; a second range in the same process (tests, notebooks) may ask
        # for another precision. Only safe without a process group.
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mp, cpu=cpu)


def make_teacher(unet, acc, compile_: bool = False):
    """A frozen copy of the pretrained UNet on the accelerator's device, in eval mode, without gradients.

    Under CUDA mixed precision its weights are stored in the autocast dtype, so no step re-casts them.
    """
    import copy

    import torch

    teacher = copy.deepcopy(unet).to(acc.device)
    if acc.mixed_precision in ("bf16", "fp16") and acc.device.type == "cuda":
        # nn.Module.to: diffusers' own .to() warns about fp32-only modules even when there are none
        torch.nn.Module.to(teacher, torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16)
    teacher.eval().requires_grad_(False)
    if compile_:
        compile_module(teacher)
    return teacher


def make_student(unet, projection: bool, acc, gradient_checkpointing: bool = False, compile_: bool = False):
    """The pretrained UNet with identity projections (or none), on the device, in training mode (takes `unet`)."""
    student = wrap(unet, projection).to(acc.device)
    student.train()
    if gradient_checkpointing:
        student.unet.enable_gradient_checkpointing()
    if compile_:
        compile_module(student.unet)  # in place: state_dict keys stay; the projection hooks are traced into the graph
    return student


def make_optimizer(params: list, train, device):
    """AdamW with the recipe's hyper-parameters; on CUDA the fused kernel (one launch updates every tensor)."""
    import torch

    return torch.optim.AdamW(params, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                             weight_decay=train.weight_decay, **({"fused": True} if device.type == "cuda" else {}))


def _seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([0xDE3E, *parts]).generate_state(1, np.uint64)[0] >> 1)


# --- one range's training state -----------------------------------------------------------------------------------

class DataStream:
    """Endless micro-batches in the resumable order of data.EpochBatches; (epoch, batch) is the next position."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, num_processes: int, num_workers: int,
                 pin_memory: bool, epoch: int = 0, batch: int = 0):
        self.dataset, self.B, self.seed, self.rank, self.P = dataset, batch_size, seed, rank, num_processes
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.batch = epoch, batch
        self._it = None

    def _epoch_iter(self):
        import torch
        from torch.utils.data import DataLoader

        while True:
            sampler = EpochBatches(len(self.dataset), self.B, self.seed, self.epoch, self.batch, self.rank, self.P)
            # a private generator: the loader must not draw from the global torch RNG
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0))
            for batch in loader:
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def next(self):
        if self._it is None:
            self._it = self._epoch_iter()
        return next(self._it)


class RangeTrainer:
    """Everything one range's training needs: models, optimizer, schedules, EMA, data, generators, step."""

    def __init__(self, recipe, rng: Range, pipeline_dir: Path, T: int):
        import torch
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        tr, dm = recipe.train, recipe.deme
        self.recipe, self.range, self.T = recipe, rng, T
        self.acc = acc = make_accelerator(tr)
        device = acc.device

        # Construct networks: the student gets projections, the teacher is a frozen copy of the pretrained UNet.
        base = load_unet(pipeline_dir)
        self.base_hash = unet_hash(base)
        self.compiled = use_compile(tr.compile, device)
        self.teacher = make_teacher(base, acc, self.compiled) if dm.consistency_weight > 0 else None
        self.student = make_student(base, dm.projection, acc, tr.gradient_checkpointing, self.compiled)
        named = list(self.student.named_parameters())
        self.params = [p for _, p in named]

        # Optimizer, LR schedule, EMA, noise schedule.
        self.optimizer = make_optimizer(self.params, tr, device)
        self.lr_scheduler = get_scheduler(LR_SCHEDULES[tr.lr_schedule], self.optimizer,
                                          num_warmup_steps=tr.lr_warmup_steps, num_training_steps=tr.steps)
        self.ema = EMA(named, tr.ema_max_decay, tr.ema_power) if tr.ema else None
        self.noise_scheduler = DDPMScheduler.from_config(scheduler_config(pipeline_dir))
        if self.noise_scheduler.config.prediction_type not in TARGETS:
            raise UsageError(f"the scheduler's prediction_type '{self.noise_scheduler.config.prediction_type}' is not "
                             f"supported (known: {', '.join(TARGETS)})")

        # Data and randomness: per-process generators owned by the trainer (checkpointed).
        self.task = make_task(recipe, pipeline_dir, base, device)
        rank, P = acc.process_index, acc.num_processes
        self.data = DataStream(self.task.dataset(), tr.batch_size, recipe.seed, rank, P, recipe.data.num_workers,
                               pin_memory=device.type == "cuda")
        self.generators = {
            "timesteps": torch.Generator().manual_seed(_seed(recipe.seed, rng.index, rank, 1)),
            "noise": torch.Generator(device=device).manual_seed(_seed(recipe.seed, rng.index, rank, 2)),
        }
        self.step = 0
        self.student, self.optimizer = acc.prepare(self.student, self.optimizer)

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def _micro_batches(self, counts: list):
        import torch

        tr, dm, r = self.recipe.train, self.recipe.deme, self.range
        for _ in range(tr.grad_accum):
            x0, kwargs = self.task.prepare(self.data.next())
            t = sample_timesteps(x0.shape[0], r.lo, r.hi, self.T, dm.p, per_sample=dm.sampling == "per_sample",
                                 antithetic=dm.antithetic, generator=self.generators["timesteps"])
            counts[0] += int(((t >= r.lo) & (t < r.hi)).sum())
            counts[1] += t.numel()
            noise = torch.randn(x0.shape, generator=self.generators["noise"], device=x0.device, dtype=x0.dtype)
            yield x0, kwargs, to_device(t, x0.device), noise

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches), EMA update; returns the step's metrics line."""
        return self.launch_step()()

    def launch_step(self):
        """Queue one optimizer step without waiting for the GPU; returns a function that gives its metrics line.

        Reading the losses waits for the step to finish, so the loop reads step k's line after queuing step k + 1:
        the host prepares the next step while the GPU computes this one.
        """
        import torch

        tr = self.recipe.train
        lr = self.lr_scheduler.get_last_lr()[0]
        counts = [0, 0]
        out = optimizer_step(self.acc, self.student, self.teacher, self.optimizer, self.params, self.noise_scheduler,
                             self._micro_batches(counts), tr.grad_accum, self.recipe.deme.consistency_weight,
                             tr.max_grad_norm)
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update(self.params)
        self.step += 1
        keys = [k for k in ("loss", "denoise_loss", "consistency_loss", "grad_norm") if out[k] is not None]
        vals = torch.stack([torch.as_tensor(out[k], dtype=torch.float32, device=self.acc.device).reshape(())
                            for k in keys] + [torch.full((), counts[0] / counts[1], device=self.acc.device)])
        if self.acc.num_processes > 1:
            vals = self.acc.reduce(vals, reduction="mean")
        step, epoch = self.step, self.data.epoch

        def line() -> dict:
            v = vals.tolist()
            out = {"step": step, **dict(zip(keys, v[:-1])), "lr": lr, "t_in_range_fraction": v[-1], "epoch": epoch}
            out.setdefault("consistency_loss", None)
            return out
        return line

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def unwrapped(self):
        return self.acc.unwrap_model(self.student)

    def save_checkpoint(self, ckpt_dir: Path) -> None:
        """All processes call this; the main process writes (every process's RNG state is gathered first)."""
        from accelerate.utils import gather_object

        rng = [checkpoints.rng_state(self.generators)]
        if self.acc.num_processes > 1:
            rng = gather_object(rng)
        if self.acc.is_main_process:
            scaler = self.acc.scaler.state_dict() if self.acc.scaler is not None else None
            checkpoints.save(
                ckpt_dir, self.step, student=self.unwrapped().state_dict(),
                ema=self.ema.state_dict() if self.ema is not None else None,
                optim={"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                       "scaler": scaler},
                rng=rng, keep=self.recipe.train.keep_checkpoints,
                state={"epoch": self.data.epoch, "batch": self.data.batch,
                       "ema_updates": self.ema.updates if self.ema is not None else 0,
                       "range": self.range.as_dict(), "base_hash": self.base_hash,
                       "num_processes": self.acc.num_processes})
        self.acc.wait_for_everyone()

    def load_checkpoint(self, folder: Path) -> None:
        ck = checkpoints.load(folder, self.generators, rank=self.acc.process_index)
        st = ck["state"]
        if st.get("range") != self.range.as_dict():
            raise UsageError(f"checkpoint '{folder}' was made for range {st.get('range')}, not "
                             f"{self.range.as_dict()}; start the range over with --force")
        if st.get("base_hash") != self.base_hash:
            raise UsageError(f"checkpoint '{folder}' was made from another pretrained model; start the range over "
                             f"with --force")
        if st.get("num_processes", 1) != self.acc.num_processes:
            raise UsageError(f"checkpoint '{folder}' was written by {st.get('num_processes', 1)} process(es), this "
                             f"run has {self.acc.num_processes}; resume with the same number of processes")
        try:
            self.unwrapped().load_state_dict(ck["student"])
        except RuntimeError:
            raise UsageError(f"checkpoint '{folder}' does not fit this model (deme.projection changed?); start the "
                             f"range over with --force") from None
        if self.ema is not None:
            if ck["ema"] is None:
                raise UsageError(f"checkpoint '{folder}' has no EMA weights but train.ema is on; start the range "
                                 f"over with --force")
            self.ema.load_state_dict(ck["ema"], st["ema_updates"])
        self.optimizer.load_state_dict(ck["optim"]["optimizer"])
        self.lr_scheduler.load_state_dict(ck["optim"]["lr_scheduler"])
        if self.acc.scaler is not None and ck["optim"].get("scaler"):
            self.acc.scaler.load_state_dict(ck["optim"]["scaler"])
        self.step = int(st["step"])
        self.data.epoch, self.data.batch, self.data._it = int(st["epoch"]), int(st["batch"]), None

    def final_states(self) -> tuple[dict, Optional[dict]]:
        """(raw state dict, EMA state dict or None) of the student, keys unet.* and projections.*."""
        raw = self.unwrapped().state_dict()
        if self.ema is None:
            return raw, None
        ema = {**raw, **self.ema.state_dict()}
        return raw, ema


# --- the loop ----------------------------------------------------------------------------------------------------

def train_ranges(recipe, run: RunDir, index: Optional[int], force: bool = False) -> list[dict]:
    """Train range `index` (or every range when None), one after another. Returns one summary per range."""
    n = recipe.ranges.n
    if index is not None and not 0 <= index < n:
        raise UsageError(f"range {index} does not exist: the recipe has ranges.n = {n}, so --range takes 0 to {n - 1}")
    pipeline_dir = resolve_pretrained(recipe.model.pretrained, recipe.model.revision)
    T = num_train_timesteps(pipeline_dir)
    ranges = load_ranges(recipe, run)
    chosen = ranges if index is None else [ranges[index]]
    return [train_range(recipe, run, r, pipeline_dir, T, force=force) for r in chosen]


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


def trained_meta(recipe, run: RunDir, r: Range) -> Optional[dict]:
    """deme.json of range r's final model when it is finished for this recipe (train.steps, same [lo, hi)), else None.

    Raises UsageError when the range's latest checkpoint is past train.steps.
    """
    tr = recipe.train
    resume = checkpoints.latest(run.checkpoints(r.index))
    resume_step = int(json.loads((resume / "state.json").read_text())["step"]) if resume else 0
    if resume_step > tr.steps:
        raise UsageError(f"range {r.index} already has a checkpoint at step {resume_step}, past train.steps = "
                         f"{tr.steps}; raise train.steps or start over with --force")
    if run.final(r.index).is_dir() and resume_step in (0, tr.steps):
        meta = read_meta(run.final(r.index))
        if meta.get("steps") == tr.steps and meta.get("range", {}).get("lo") == r.lo \
                and meta.get("range", {}).get("hi") == r.hi:
            return meta
    return None


def reexport_if_stale(run: RunDir, r: Range) -> bool:
    """Re-export a finished range's final/ that was exported before the EMA fix (exports.py) from its last
    checkpoint, saying so in one line; True when it did. UsageError when no checkpoint is left to do it from."""
    # under accelerate launch only the main process rewrites the folder; the others see it finished
    if not exports.is_stale(run.final(r.index)) or int(os.environ.get("RANK", "0")) != 0:
        return False
    ck = exports.reexport(run, r.index)
    ui.info(f"range {r.index}: final/ held the raw weights (exported before the EMA fix); re-exported the EMA weights "
            f"from checkpoints/{ck.name} without training")
    return True


def train_range(recipe, run: RunDir, r: Range, pipeline_dir: Path, T: int, force: bool = False) -> dict:
    """DeMe-finetune one range (see the module docstring); resumes from its latest checkpoint."""
    tr = recipe.train
    rdir, ckpt_dir, metrics = run.range_dir(r.index), run.checkpoints(r.index), run.metrics(r.index)

    # Start over, or skip a finished range.
    if force:
        for p in (ckpt_dir, run.final(r.index), run.final(r.index, ema=False)):
            shutil.rmtree(p, ignore_errors=True)
        metrics.unlink(missing_ok=True)
    resume = checkpoints.latest(ckpt_dir)
    meta = trained_meta(recipe, run, r)
    if meta is not None:
        if not reexport_if_stale(run, r):
            ui.info(f"range {r.index} is already trained for {tr.steps} steps ({run.final(r.index)}); "
                    f"use --force to train it again")
        return _summary(r, tr.steps, meta.get("loss"), run.final(r.index), skipped=True)

    # Build the trainer and resume.
    trainer = RangeTrainer(recipe, r, pipeline_dir, T)
    main = trainer.acc.is_main_process
    if resume is not None:
        trainer.load_checkpoint(resume)
        if main:
            ui.info(f"range {r.index}: resuming from {resume.name}")
    if main:
        rdir.mkdir(parents=True, exist_ok=True)
        write_atomic(rdir / "recipe.resolved.toml", recipe.to_toml())
        _truncate_metrics(metrics, trainer.step)

    # Train.
    desc = f"range {r.index} [{r.lo}, {r.hi})"
    with (ui.progress(desc, total=tr.steps, start=trainer.step, unit="step", every=tr.log_every) if main
          else nullcontext()) as bar:
        with (open(metrics, "a") if main else nullcontext()) as log:
            def record(pending) -> None:
                line = pending()
                if main:
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    bar.update(1, loss=line["loss"], cons=line["consistency_loss"], lr=line["lr"])

            pending = None          # the step whose metrics are not read yet (read after queuing the next one)
            while trainer.step < tr.steps:
                queued = trainer.launch_step()
                if pending is not None:
                    record(pending)
                pending = queued
                if trainer.step % tr.checkpoint_every == 0 or trainer.step == tr.steps:
                    record(pending)  # a checkpoint at step k comes after metric line k (resume truncates past it)
                    pending = None
                    trainer.save_checkpoint(ckpt_dir)

    # Save the final models: EMA (or raw) in final/, raw in final-raw/.
    loss = _recent_loss(metrics) if main else None
    if main:
        raw, ema = trainer.final_states()
        meta = {"range": r.as_dict(), "T": T, "steps": trainer.step, "base_hash": trainer.base_hash,
                "recipe": recipe.name, "ema": ema is not None, "projection": recipe.deme.projection,
                "deme": recipe.deme.model_dump(), "loss": loss}
        model = trainer.unwrapped()
        save_model_folder(run.final(r.index, ema=False), model, {**meta, "weights": "raw"}, state=raw)
        save_model_folder(run.final(r.index), model, {**meta, "weights": "ema" if ema is not None else "raw"},
                          state=ema if ema is not None else raw)
    trainer.acc.wait_for_everyone()
    return _summary(r, trainer.step, loss, run.final(r.index), skipped=False)
