"""Training throughput (img/s) of three steps on the same device, model and batch; prints the table and ratios.

    python benchmarks/throughput.py --out throughput.json            # GPU: CIFAR10 (batch 128) and LSUN-256 (16)
    python benchmarks/throughput.py --quick --out throughput.json    # CPU: tiny batches, LSUN arch at 64 px

Variants (random weights in the real architectures; timing only):
  authors         the authors' style of DeMe step, as in their release: fp16 autocast with a GradScaler, eager, the
                  student as a plain nn.Module (UNet + identity projections), a frozen fp32 teacher forward under
                  no_grad, AdamW (torch's default implementation), grad-norm clipping, diffusers' EMAModel (per-tensor
                  loop, warm-up power 3/4) and the loss read back every step (`loss.item()` for the progress bar).
  authors_noema   the same without the EMA update: the step that ../shared/tools/gpu_baseline.py timed (1,854 img/s
                  on an H200 for CIFAR10).
  ours            what `deme train` runs: a RangeTrainer built from a recipe (bf16 autocast on CUDA, fused AdamW,
                  torch.compile of student and teacher per train.compile, bf16 teacher weights under inference mode,
                  our EMA) stepping through RangeTrainer.launch_step with the metrics of step k read after step k + 1
                  is queued, exactly as train.train_range does. The data stream is replaced by one fixed batch (as
                  for the other variants) unless --data folder, which reads PNGs through the recipe's DataLoader.
  plain           a plain diffusers step without teacher or projections: bf16 autocast, eager, fused AdamW on CUDA,
                  no EMA (gpu_baseline.py's "bf16" row: 2,761 img/s on an H200 for CIFAR10).
Ratios printed: ours / authors, ours / authors_noema, ours / plain. The goal on a GPU is ours >= 1.4 x authors on
CIFAR10. On the CPU every variant runs in fp32 (fp16/bf16 autocast is many times slower there, and the recipe's
auto precision is fp32 on the CPU) and without compile, so the CPU ratios show only the structural costs (teacher
forward, EMA, per-step reads); they say nothing about GPU speed.

The JSON written to --out (after every row, so a run stopped by a time limit keeps what it measured) holds the device
name, versions, every row and the ratios; benchmarks/results_md.py turns it into RESULTS.md rows.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARCHS = {
    # google/ddpm-cifar10-32 (35.7M params)
    "cifar10": dict(res=32, batch=128, quick_res=32, quick_batch=4, steps=20, config=dict(
        block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), downsample_padding=0,
        flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None)),
    # google/ddpm-ema-church-256 / bedroom-256 (113.7M params)
    "lsun256": dict(res=256, batch=16, quick_res=64, quick_batch=1, steps=10, config=dict(
        block_out_channels=(128, 128, 256, 256, 512, 512), layers_per_block=2,
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4, attention_head_dim=None)),
}
VARIANTS = ("authors", "authors_noema", "ours", "plain")
LO, HI, T = 0, 250, 1000           # the range the DeMe steps train (range 0 of 4)


# --- timing ------------------------------------------------------------------------------------------------------

def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench_device(choice: str, threads: int):
    """The device to time on (auto: CUDA when present), with the CPU thread count set (default 1 on the CPU)."""
    import torch

    dev = torch.device("cuda" if choice == "auto" and torch.cuda.is_available() else
                       ("cpu" if choice == "auto" else choice))
    if threads or dev.type == "cpu":
        torch.set_num_threads(threads or 1)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return dev


def device_info(name: str, dev) -> dict:
    """The head of a results JSON: benchmark name, device, versions, time."""
    import diffusers
    import torch

    return {"benchmark": name, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "device_type": dev.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def time_steps(step, finish, dev, warmup: int, steps: int) -> dict:
    """Run `warmup` then `steps` calls of step(); finish() drains what is still queued. Seconds and peak memory."""
    import torch

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    finish()
    _sync(dev)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    finish()
    _sync(dev)
    t2, c2 = time.perf_counter(), time.process_time()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"warmup_s": round(t1 - t0, 2), "seconds": t2 - t1, "cpu_seconds": c2 - c1,
            "peak_gib": round(peak, 2) if peak else None}


# --- the variants ------------------------------------------------------------------------------------------------

def _unet(cfg, dev):
    import torch
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**cfg).to(dev)


def authors_step(cfg, dev, batch, ema: bool):
    """The release's step (see the module docstring); returns (step, finish)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from deme_cli.engine.models import wrap
    from deme_cli.engine.ranges import sample_timesteps

    cuda = dev.type == "cuda"
    unet = _unet(cfg, dev)
    teacher = copy.deepcopy(unet).eval().requires_grad_(False)          # fp32 weights, autocast does the casts
    student = wrap(unet, True).to(dev).train()
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    scaler = torch.amp.GradScaler(dev.type, enabled=cuda)
    ema_model = EMAModel(params, decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4) if ema else None
    sched = DDPMScheduler(num_train_timesteps=T)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand((batch, 3, cfg["sample_size"], cfg["sample_size"]), generator=g) * 2 - 1).to(dev)

    def step():
        noise = torch.randn_like(x0)
        t = sample_timesteps(batch, LO, HI, T, 0.3, generator=g).to(dev)
        x_t = sched.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.float16, enabled=cuda):
            pred = student(x_t, t).sample
            with torch.no_grad():
                target = teacher(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise) + F.mse_loss(pred.float(), target.float())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if ema_model is not None:
            ema_model.step(params)
        loss.detach().item()                                           # logged every step

    return step, lambda: None


def plain_step(cfg, dev, batch):
    """A plain diffusers step without teacher (gpu_baseline.py's bf16 row); returns (step, finish)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    cuda = dev.type == "cuda"
    unet = _unet(cfg, dev).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6,
                            **({"fused": True} if cuda else {}))
    sched = DDPMScheduler(num_train_timesteps=T)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand((batch, 3, cfg["sample_size"], cfg["sample_size"]), generator=g) * 2 - 1).to(dev)

    def step():
        noise = torch.randn_like(x0)
        t = torch.randint(0, T, (batch,), device=dev)
        x_t = sched.add_noise(x0, noise, t)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            pred = unet(x_t, t).sample
        F.mse_loss(pred.float(), noise).backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, lambda: None


class FixedBatches:
    """Stands in for train.DataStream: the same batch of images every time (no data loading in the timing)."""

    def __init__(self, batch):
        self.x, self.epoch, self.batch = batch, 0, 0

    def next(self):
        return self.x


def ours_step(cfg, dev, batch, workdir: Path, data: str, compile_: str):
    """`deme train`'s step: RangeTrainer.launch_step, metrics read one step late; returns (step, finish, info)."""
    import numpy as np
    from diffusers import DDPMPipeline, DDPMScheduler
    from PIL import Image

    from deme_cli.engine.ranges import Range
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.trainer import RangeTrainer

    res = cfg["sample_size"]
    pipe, images = workdir / "pipe", workdir / "images"
    if not pipe.is_dir():
        DDPMPipeline(unet=_unet(cfg, "cpu"), scheduler=DDPMScheduler(num_train_timesteps=T)).save_pretrained(pipe)
    images.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(batch):
        Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(images / f"{k:05d}.png")
    recipe = recipe_from_dict({
        "name": "throughput", "model": {"pretrained": str(pipe)},
        "data": {"source": "imagefolder", "path": str(images), "resolution": res, "center_crop": True,
                 # workers only when the loader is timed: with --data fixed the first batch is kept and the
                 # loader dropped, and dropping a live worker loader printed feeder-thread tracebacks on the GPU
                 "num_workers": 4 if dev.type == "cuda" and data == "folder" else 0},
        "ranges": {"n": 4}, "train": {"steps": 10**9, "batch_size": batch, "device": dev.type, "compile": compile_},
        "output": {"dir": str(workdir / "run")}})
    base = resolve_base(recipe.model, recipe.train.device, recipe.train.mixed_precision)
    trainer = RangeTrainer(base, Range(0, LO, HI), data=recipe.data, train=recipe.train, deme=recipe.deme,
                           seed=recipe.seed)
    if data == "fixed":
        trainer.data = FixedBatches(trainer.data.next())
    pending = [None]

    def step():
        queued = trainer.launch_step()
        if pending[0] is not None:
            pending[0]()
        pending[0] = queued

    def finish():
        if pending[0] is not None:
            pending[0]()
            pending[0] = None

    info = {"precision": trainer.acc.mixed_precision, "compile": trainer.compiled,
            "fused_adamw": bool(trainer.optimizer.optimizer.defaults.get("fused")),
            "teacher_dtype": str(next(trainer.teacher.parameters()).dtype).replace("torch.", "")}
    return step, finish, info


# --- main --------------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="cifar10,lsun256", help="comma-separated: " + ", ".join(ARCHS))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="tiny batches and few steps (CPU smoke run)")
    ap.add_argument("--batch", type=int, help="override every architecture's batch size")
    ap.add_argument("--steps", type=int, help="timed steps per variant (default: 20 CIFAR10, 10 LSUN; quick: 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 5; quick: 1)")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="train.compile for ours")
    ap.add_argument("--data", choices=["fixed", "folder"], default="fixed",
                    help="ours: one fixed batch (like the others) or PNGs through the recipe's DataLoader")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU intra-op threads (default: 1 on the CPU, where other jobs' load makes spinning OpenMP "
                         "threads many times slower; the CPU time is then the steadiest measure)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip the remaining rows after this many seconds")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    dev = bench_device(args.device, args.threads)
    T0 = time.perf_counter()
    out = {**device_info("throughput", dev), "quick": args.quick, "data": args.data, "rows": [],
           "ratios": {}}

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for arch in [a.strip() for a in args.archs.split(",") if a.strip()]:
        spec = ARCHS[arch]
        res = spec["quick_res"] if args.quick else spec["res"]
        batch = args.batch or (spec["quick_batch"] if args.quick else spec["batch"])
        steps = args.steps or (2 if args.quick else spec["steps"])
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
        cfg = dict(sample_size=res, in_channels=3, out_channels=3, **spec["config"])
        rates, cpu = {}, {}
        with tempfile.TemporaryDirectory(prefix=f"deme-throughput-{arch}-") as tmp:
            for variant in variants:
                if args.budget_s and time.perf_counter() - T0 > args.budget_s:
                    print(f"# {arch} {variant}: skipped (over --budget-s)", flush=True)
                    continue
                info = {}
                if variant == "authors":
                    step, finish = authors_step(cfg, dev, batch, ema=True)
                elif variant == "authors_noema":
                    step, finish = authors_step(cfg, dev, batch, ema=False)
                elif variant == "ours":
                    step, finish, info = ours_step(cfg, dev, batch, Path(tmp), args.data, args.compile)
                elif variant == "plain":
                    step, finish = plain_step(cfg, dev, batch)
                else:
                    raise SystemExit(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
                r = time_steps(step, finish, dev, warmup, steps)
                rate = batch * steps / r["seconds"]
                rates[variant], cpu[variant] = rate, r["cpu_seconds"]
                row = {"arch": arch, "res": res, "batch": batch, "variant": variant, "steps": steps,
                       "img_per_s": round(rate, 2), "ms_per_step": round(r["seconds"] / steps * 1e3, 2),
                       "cpu_ms_per_step": round(r["cpu_seconds"] / steps * 1e3, 2), "warmup_s": r["warmup_s"],
                       "peak_gib": r["peak_gib"], **info}
                out["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
                del step, finish
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        if "ours" in rates and len(rates) > 1:
            out["ratios"][arch] = {f"ours_over_{k}": round(rates["ours"] / v, 3) for k, v in rates.items()
                                   if k != "ours"}
            if dev.type == "cpu":  # by process CPU time: what the step costs, whatever else runs on the machine
                out.setdefault("cpu_time_ratios", {})[arch] = {f"ours_over_{k}": round(v / cpu["ours"], 3)
                                                               for k, v in cpu.items() if k != "ours"}
            save()

    print(f"\n{out['device']}, torch {out['torch']}, diffusers {out['diffusers']}"
          f"{' (quick: tiny batches, CPU ratios are structural only)' if args.quick else ''}")
    print(f"{'arch':9s} {'batch':>5s} {'variant':14s} {'img/s':>10s} {'ms/step':>9s} {'peak GiB':>9s}")
    for r in out["rows"]:
        print(f"{r['arch']:9s} {r['batch']:5d} {r['variant']:14s} {r['img_per_s']:10.2f} {r['ms_per_step']:9.1f} "
              f"{r['peak_gib'] if r['peak_gib'] is not None else '-':>9}")
    for arch, ratios in out["ratios"].items():
        print(f"{arch}: " + ", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}x" for k, v in ratios.items()))
    for arch, ratios in out.get("cpu_time_ratios", {}).items():
        print(f"{arch} by CPU time: " + ", ".join(f"{k.replace('_over_', ' / ')} = {v:.2f}x"
                                                  for k, v in ratios.items()))
    out["total_s"] = round(time.perf_counter() - T0, 1)
    save()


if __name__ == "__main__":
    main()
