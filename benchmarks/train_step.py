"""Cost of a DeMe training step against a plain diffusers training step, on the same UNet and batch.

    python benchmarks/train_step.py                     # CPU, small UNet (32,64,64) at 16x16, batch 32
    python benchmarks/train_step.py --device cuda       # CUDA, bf16 autocast (the default there)
    python benchmarks/train_step.py --arch cifar10 --batch 128 --res 32 --device cuda

plain : what diffusers' train_unconditional.py does per step: t ~ U[0, T), x_t, eps-MSE, backward, clip, AdamW.
deme  : train.optimizer_step, the very function `deme train` runs: the student with identity projections plus the
        frozen teacher's forward for the consistency loss (Eq. 5), t from the range sampler (Eq. 6).
Steps alternate (plain, deme, plain, ...) so that load from other processes hits both alike. Reported: the wall-time
median and best, and the median process CPU time (on a CPU shared with other jobs the CPU time is the steadiest; use
--threads 1 there, since spinning OpenMP threads inflate both), with one teacher forward on its own for reference.
Random weights: timing only.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ARCHS = {
    # the small UNet of reference/ecosystem.md (1.1M params)
    "small": dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    # google/ddpm-cifar10-32 (35.7M params)
    "cifar10": dict(block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--res", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--precision", choices=["auto", "no", "bf16", "fp16"], default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile both the plain UNet and the DeMe models")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel

    from deme_cli.engine.ranges import sample_timesteps
    from deme_cli.engine.devices import pick_device, resolve_precision
    from deme_cli.engine.loss import optimizer_step
    from deme_cli.engine.trainer import make_accelerator, make_student, make_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    acc = make_accelerator(device, resolve_precision(args.precision, device))
    dev = acc.device
    torch.manual_seed(0)
    cfg = dict(sample_size=args.res, in_channels=3, out_channels=3, **ARCHS[args.arch])
    sched = DDPMScheduler(num_train_timesteps=1000)
    T, lo, hi = 1000, 0, 250

    # plain: the UNet alone
    plain = UNet2DModel(**cfg).to(dev).train()
    if args.compile:
        plain.compile()
    plain_opt = torch.optim.AdamW(plain.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    plain, plain_opt = acc.prepare(plain, plain_opt)

    # deme: teacher + student with projections, exactly as RangeTrainer builds them
    base = UNet2DModel(**cfg)
    base.load_state_dict(acc.unwrap_model(plain).state_dict())
    teacher = make_teacher(base, acc, args.compile)
    student = make_student(base, True, acc, compile_=args.compile)
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    student, opt = acc.prepare(student, opt)

    g = torch.Generator().manual_seed(0)
    gn = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.rand((args.batch, 3, args.res, args.res), generator=g).to(dev) * 2 - 1

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain_step():
        noise = torch.randn(x0.shape, generator=gn, device=dev)
        t = torch.randint(0, T, (args.batch,), generator=g).to(dev)
        x_t = sched.add_noise(x0, noise, t)
        with acc.autocast():
            pred = plain(x_t, t).sample
        loss = F.mse_loss(pred.float(), noise)
        acc.backward(loss)
        acc.clip_grad_norm_(plain.parameters(), 1.0)
        plain_opt.step()
        plain_opt.zero_grad(set_to_none=True)

    def micro():
        t = sample_timesteps(args.batch, lo, hi, T, 0.3, generator=g).to(dev)
        yield x0, {}, t, torch.randn(x0.shape, generator=gn, device=dev)

    def deme_step():
        optimizer_step(acc, student, teacher, opt, params, sched, micro(), 1, 1.0, 1.0)

    def teacher_forward():
        t = torch.randint(0, T, (args.batch,), generator=g).to(dev)
        with torch.inference_mode(), acc.autocast():
            teacher(x0, t).sample

    fns = {"plain": plain_step, "deme": deme_step, "teacher_forward": teacher_forward}
    timings = {k: [] for k in fns}
    cpu_times = {k: [] for k in fns}   # process CPU time: on a shared CPU it hardly sees other processes' load
    for k in range(args.warmup + args.steps):
        for name, fn in fns.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync()
            if k >= args.warmup:
                timings[name].append(time.perf_counter() - t0)
                cpu_times[name].append(time.process_time() - c0)

    med = {k: statistics.median(v) for k, v in timings.items()}
    best = {k: min(v) for k, v in timings.items()}  # other processes only ever add time: best-of is the least disturbed
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    n_params = sum(p.numel() for p in base.parameters())
    result = {"device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
              "precision": acc.mixed_precision, "compile": args.compile, "threads": torch.get_num_threads(),
              "arch": args.arch, "params_M": round(n_params / 1e6, 2), "batch": args.batch, "res": args.res,
              "steps": args.steps,
              "plain_s": med["plain"], "deme_s": med["deme"], "teacher_forward_s": med["teacher_forward"],
              "deme_over_plain": med["deme"] / med["plain"],
              "best_plain_s": best["plain"], "best_deme_s": best["deme"], "best_teacher_forward_s": best["teacher_forward"],
              "best_deme_over_plain": best["deme"] / best["plain"],
              "cpu_plain_s": cpu["plain"], "cpu_deme_s": cpu["deme"], "cpu_teacher_forward_s": cpu["teacher_forward"],
              "cpu_deme_over_plain": cpu["deme"] / cpu["plain"],
              "plain_plus_teacher_over_plain": (med["plain"] + med["teacher_forward"]) / med["plain"],
              "plain_img_per_s": args.batch / med["plain"], "deme_img_per_s": args.batch / med["deme"]}
    print(f"{result['device']} {result['precision']} {args.arch} ({result['params_M']}M params) batch {args.batch} "
          f"@ {args.res}px, median of {args.steps} steps")
    print("                       wall median    wall best   CPU median")
    for label, k in (("plain diffusers step", "plain"), ("DeMe step", "deme"), ("teacher forward", "teacher_forward")):
        print(f"  {label:20s} : {med[k] * 1e3:9.1f} ms {best[k] * 1e3:9.1f} ms {cpu[k] * 1e3:9.1f} ms  "
              f"({args.batch / med[k]:.0f} img/s)")
    print(f"  ratio DeMe / plain   : {result['deme_over_plain']:9.3f}    {result['best_deme_over_plain']:9.3f}    "
          f"{result['cpu_deme_over_plain']:9.3f}")
    print(f"  (plain + teacher forward) / plain, wall median: {result['plain_plus_teacher_over_plain']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
