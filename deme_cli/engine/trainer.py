"""One range's training state: student, frozen teacher, AdamW and its LR schedule, EMA, data stream, generators.

`RangeTrainer(base, range, data=..., train=..., deme=..., seed=...)` builds everything one range needs (paper section
3.2): the student is the pretrained UNet with identity-initialised channel-wise projections, the teacher a frozen copy
of the pretrained UNet, and `train_step()` is one optimizer step of Eq. 5 (loss.py) on timesteps drawn by Eq. 6
(ranges.sample_timesteps). accelerate places the models and runs mixed precision and DDP; checkpoints hold the
student, EMA, optimizer, LR schedule, data position and every generator, so a resumed range continues the same loss
curve. The loop that drives it (resume, logging, checkpoints, final export) is `deme train`'s (commands/train.py).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from . import adapters, checkpoints, tracking, ui
from .errors import UsageError
from .loss import LossWeighting, optimizer_step
from .models import save_model_folder, unet_hash, wrap
from .ranges import Range, sample_timesteps
from .speed import compile_module, to_device, use_compile

LR_SCHEDULES = {  # recipe name -> diffusers.optimization.get_scheduler name (all honour lr_warmup_steps)
    "constant": "constant_with_warmup",
    "cosine": "cosine",
    "linear": "linear",
}


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

    @contextmanager
    def applied(self, params: list):
        """Inside the block `params` hold the EMA weights (previews); their own values are restored exactly after."""
        import torch

        with torch.no_grad():
            raw = [p.detach().clone() for p in params]
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, r in zip(params, raw):
                    p.copy_(r)

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


def make_accelerator(device, precision: str, log_with: str = "none", logs_dir: Optional[Path] = None):
    """An accelerate Accelerator on `device` (CPU or CUDA) computing in `precision` (fp32 | bf16 | fp16: the base's
    resolved train.mixed_precision), with train.log_with's tracker logging to `logs_dir` (tracking.py; none when
    `logs_dir` is None)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = device.type == "cpu"
    mp = {"fp32": "no"}.get(precision, precision)
    if cpu and mp != "no":
        ui.warn(f"mixed_precision = {mp} on the CPU is slow (often ~10x); train.mixed_precision = \"no\" is faster")
    kw = tracking.accelerator_kwargs(log_with, logs_dir)
    try:
        return Accelerator(mixed_precision=mp, cpu=cpu, **kw)
    except ValueError as e:
        # accelerate keeps one state per process; a second range in the same process (tests, notebooks) may ask
        # for another precision. Only safe without a process group.
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mp, cpu=cpu, **kw)


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


WORKER_GRACE_S = 60    # seconds a DataLoader worker keeps serving after SIGTERM (a step must end within it)


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """In a DataLoader worker: leave SIGINT and SIGUSR1 to the main process, which stops at a step boundary
    (interrupts.py), and outlive a SIGTERM by WORKER_GRACE_S seconds (then SIGALRM ends the worker): a signal sent
    to the whole process group must not kill the worker that is loading the batch the main process waits for. The
    main process shuts the workers down once it decides to stop, before it writes the checkpoint, and when the range
    ends (DataStream.close)."""
    import signal

    from .interrupts import SIGNALS

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(WORKER_GRACE_S))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)      # blocked by the main process while it started us


@contextmanager
def _stop_signals_blocked(block: bool):
    """Block SIGTERM/SIGINT/SIGUSR1 in this thread while the DataLoader forks its workers: they inherit the mask and
    unblock once their handlers are set; a signal meanwhile waits and is delivered here afterwards."""
    import signal

    from .interrupts import SIGNALS

    if not block:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


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

        from .data import EpochBatches

        while True:
            sampler = EpochBatches(len(self.dataset), self.B, self.seed, self.epoch, self.batch, self.rank, self.P)
            # a private generator: the loader must not draw from the global torch RNG
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0),
                                worker_init_fn=ignore_stop_signals if self.num_workers else None)
            with _stop_signals_blocked(self.num_workers > 0):   # workers start with them blocked (no window
                batches = iter(loader)                           # before ignore_stop_signals); here they wait
            for batch in batches:
                self.batch += 1
                yield batch
            self.epoch, self.batch = self.epoch + 1, 0

    def next(self):
        if self._it is None:
            self._it = self._epoch_iter()
        return next(self._it)

    def close(self) -> None:
        """Stop the DataLoader's worker processes now."""
        if self._it is not None:
            self._it.close()
            self._it = None


class RangeTrainer:
    """Everything one range's training needs: models, optimizer, schedules, EMA, data, generators, step."""

    def __init__(self, base, rng: Range, *, data, train, deme, seed: int, cache_dir: Optional[Path] = None,
                 logs_dir: Optional[Path] = None):
        """base       the resolved base (base.Base; its precision is train.mixed_precision)
        data, train, deme   the recipe's [data], [train] and [deme] sections; seed: the recipe's seed
        cache_dir  where a text-to-image task caches latents (data.cache_latents)
        logs_dir   where train.log_with's tracker writes (None: no tracker)"""
        import torch
        from diffusers.optimization import get_scheduler

        self.train, self.deme, self.range, self.T = train, deme, rng, base.T
        self.acc = acc = make_accelerator(base.device, base.precision, train.log_with, logs_dir)
        device = acc.device

        # Construct networks: the student gets projections, the teacher is a frozen copy of the pretrained UNet.
        unet = base.load_unet()
        self.base_hash = unet_hash(unet)
        self.compiled = use_compile(train.compile, device)
        self.teacher = make_teacher(unet, acc, self.compiled) if deme.consistency_weight > 0 else None
        # deme.adapter = "lora": the base weights freeze and only the adapters (and projections) train
        self.lora = adapters.add_lora(unet, deme, _seed(seed, rng.index, 3)) if adapters.is_lora(deme) else None
        self.student = make_student(unet, deme.projection, acc, train.gradient_checkpointing, self.compiled)
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]

        # Optimizer, LR schedule, EMA, noise schedule.
        self.optimizer = make_optimizer(self.params, train, device)
        self.lr_scheduler = get_scheduler(LR_SCHEDULES[train.lr_schedule], self.optimizer,
                                          num_warmup_steps=train.lr_warmup_steps, num_training_steps=train.steps)
        self.ema = EMA(named, train.ema_max_decay, train.ema_power) if train.ema else None
        self.noise_scheduler = base.noise_scheduler()

        # Data and randomness: per-process generators owned by the trainer (checkpointed).
        self.task = base.kind.task(base, unet, data, seed=seed, device=device, cache_dir=cache_dir,
                                   batch_size=train.batch_size)
        rank, P = acc.process_index, acc.num_processes
        self.data = DataStream(self.task.dataset(), train.batch_size, seed, rank, P, data.num_workers,
                               pin_memory=device.type == "cuda")
        self.generators = {
            "timesteps": torch.Generator().manual_seed(_seed(seed, rng.index, rank, 1)),
            "noise": torch.Generator(device=device).manual_seed(_seed(seed, rng.index, rank, 2)),
        }
        self.step = 0
        self.student, self.optimizer = acc.prepare(self.student, self.optimizer)

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def _micro_batches(self, counts: list):
        import torch

        tr, dm, r = self.train, self.deme, self.range
        for _ in range(tr.grad_accum):
            x0, kwargs = self.task.prepare(self.data.next())
            t = sample_timesteps(x0.shape[0], r.lo, r.hi, self.T, dm.p, per_sample=dm.sampling == "per_sample",
                                 antithetic=dm.antithetic, generator=self.generators["timesteps"])
            counts[0] += int(((t >= r.lo) & (t < r.hi)).sum())
            counts[1] += t.numel()
            noise = torch.randn(x0.shape, generator=self.generators["noise"], device=x0.device, dtype=x0.dtype)
            yield x0, kwargs, to_device(t, x0.device), noise

    def close(self) -> None:
        """Release what outlives a step: the data workers."""
        self.data.close()

    def train_step(self) -> dict:
        """One optimizer step (grad_accum micro-batches), EMA update; returns the step's metrics line."""
        return self.launch_step()()

    def launch_step(self):
        """Queue one optimizer step without waiting for the GPU; returns a function that gives its metrics line.

        Reading the losses waits for the step to finish, so the loop reads step k's line after queuing step k + 1:
        the host prepares the next step while the GPU computes this one.
        """
        import torch

        tr = self.train
        lr = self.lr_scheduler.get_last_lr()[0]
        counts = [0, 0]
        out = optimizer_step(self.acc, self.student, self.teacher, self.optimizer, self.params, self.noise_scheduler,
                             self._micro_batches(counts), tr.grad_accum, self.deme.consistency_weight,
                             tr.max_grad_norm, LossWeighting.from_section(tr))
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

    def any_process(self, flag: bool) -> bool:
        """Whether `flag` holds in any process (so that every process stops at the same step; one process: itself)."""
        if self.acc.num_processes == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.acc.device)
        return bool(self.acc.reduce(t, reduction="sum").item() > 0)

    def weights_finite(self) -> bool:
        """Whether every trained weight is finite (checked before a checkpoint is written)."""
        import torch

        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all().item())

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
                ckpt_dir, self.step, student=self.trainable_state(),
                ema=self.ema.state_dict() if self.ema is not None else None,
                optim={"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                       "scaler": scaler},
                rng=rng, keep=self.train.keep_checkpoints,
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
            self.load_trainable_state(ck["student"])
        except RuntimeError:
            raise UsageError(f"checkpoint '{folder}' does not fit this model (deme.projection or deme.adapter "
                             f"changed?); start the range over with --force") from None
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

    def trainable_state(self) -> dict:
        """What a checkpoint and a range model keep of the student: its whole state dict, or with LoRA only the
        trained tensors (adapters and projections; the frozen base is model.pretrained's)."""
        model = self.unwrapped()
        if self.lora is None:
            return model.state_dict()
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict) -> None:
        """Load `trainable_state()`'s tensors back (RuntimeError when they do not fit the student)."""
        model = self.unwrapped()
        if self.lora is None:
            model.load_state_dict(state)
            return
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        if set(state) != trained:
            raise RuntimeError("the checkpoint's tensors are not this student's trained ones")
        model.load_state_dict(state, strict=False)

    def export(self, folder: Path, meta: dict, state: dict, base_folder: Path) -> None:
        """Write a range model folder holding `state` (final_states' raw or EMA state) as a pipeline folder around
        `base_folder`'s other parts: a full model, or with LoRA the adapters on the base (adapters.save_lora_folder)."""
        if self.lora is None:
            save_model_folder(folder, self.unwrapped(), meta, state=state, base_folder=base_folder)
        else:
            meta = {**meta, "adapter": adapters.meta(self.lora), "base_model": str(Path(base_folder).resolve())}
            adapters.save_lora_folder(folder, self.unwrapped(), meta, state, base_folder)

    def final_states(self) -> tuple[dict, Optional[dict]]:
        """(raw state, EMA state or None) of the student (`trainable_state`), keys unet.* and projections.*."""
        raw = self.trainable_state()
        if self.ema is None:
            return raw, None
        ema = {**raw, **self.ema.state_dict()}
        return raw, ema
