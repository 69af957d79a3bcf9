"""Sampling throughput (img/s) of DDIM-50 on the CIFAR10 UNet: compiled bf16 against eager bf16, same device and batch.

    python benchmarks/sample_throughput.py --out sample_throughput.json      # GPU: batch 1024, 2 timed batches
    python benchmarks/sample_throughput.py --quick --out s.json              # CPU smoke run: batch 8, 5 steps

Variants (random weights in the google/ddpm-cifar10-32 architecture; timing only):
  eager_autocast  the usual eager loop: fp32 weights under bf16 autocast (../shared/tools/gpu_baseline.py's sampling
                  row: 186 img/s on an H200 at batch 1024).
  eager           `deme sample` with sample.compile = off: denoise.generate_batches, precision bf16 = a bf16 copy of
                  the weights without autocast, per-image seeds.
  compiled        `deme sample` as it runs on CUDA by default (sample.compile = auto): the same, torch.compile'd.
The first batch of each variant is a warm-up (compilation included) and is not timed. Ratios: compiled / eager_autocast
(the goal on a GPU: >= 2x) and compiled / eager. On the CPU every variant runs in fp32 (the recipe's auto precision
there) and compiling takes minutes; CPU numbers say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import ARCHS, _sync, bench_device, device_info  # noqa: E402  (shared with the training benchmark)

VARIANTS = ("eager_autocast", "eager", "compiled")


def eager_autocast(model, dev, batch: int, steps: int, batches: int, precision: str):
    """The plain loop: (warm-up seconds, timed seconds) for 1 + `batches` batches."""
    import torch
    from diffusers import DDIMScheduler

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    times = []
    for b in range(1 + batches):
        t0 = time.perf_counter()
        sch = DDIMScheduler(num_train_timesteps=1000)
        sch.set_timesteps(steps, device=dev)
        x = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(b)).to(dev)
        with torch.no_grad(), (torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()):
            for t in sch.timesteps:
                eps = model(x, t).sample
                x = sch.step(eps.float(), t, x).prev_sample
        x.cpu()
        times.append(time.perf_counter() - t0)
    return times[0], sum(times[1:])


def deme_generate(model, dev, batch: int, steps: int, batches: int, precision: str, compile_: bool):
    """denoise.generate_batches, as `deme sample` calls it: (warm-up seconds, timed seconds)."""
    from deme_cli.engine.denoise import UNetDenoiser, generate_batches

    seeds = list(range(batch * (1 + batches)))
    it = generate_batches(UNetDenoiser(model), "ddim", steps, seeds, scheduler_config={"num_train_timesteps": 1000},
                          batch_size=batch, precision=precision, device=dev, compile=compile_)
    t0 = time.perf_counter()
    next(it)
    t1 = time.perf_counter()
    for _ in it:
        pass
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--quick", action="store_true", help="batch 8, 5 steps, 1 timed batch (CPU smoke run)")
    ap.add_argument("--batch", type=int, help="images per batch (default 1024; quick: 8)")
    ap.add_argument("--steps", type=int, help="DDIM steps (default 50; quick: 5)")
    ap.add_argument("--batches", type=int, help="timed batches after the warm-up one (default 2; quick: 1)")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on the CPU (as sample.precision)")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default 1 on the CPU)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    import torch

    from deme_cli.engine.devices import resolve_precision

    dev = bench_device(args.device, args.threads)
    batch = args.batch or (8 if args.quick else 1024)
    steps = args.steps or (5 if args.quick else 50)
    batches = args.batches or (1 if args.quick else 2)
    precision = resolve_precision(args.precision, dev)
    out = {**device_info("sample_throughput", dev), "arch": "cifar10", "scheduler": "ddim", "steps": steps,
           "batch": batch, "timed_batches": batches, "precision": precision, "quick": args.quick, "rows": []}

    def save():
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")

    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, **ARCHS["cifar10"]["config"]).to(dev).eval()
    rates = {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if variant == "eager_autocast":
            warm, secs = eager_autocast(model, dev, batch, steps, batches, precision)
        elif variant in ("eager", "compiled"):
            warm, secs = deme_generate(model, dev, batch, steps, batches, precision, variant == "compiled")
        else:
            raise SystemExit(f"unknown variant {variant!r} (known: {', '.join(VARIANTS)})")
        _sync(dev)
        rates[variant] = batch * batches / secs
        row = {"variant": variant, "img_per_s": round(rates[variant], 2), "seconds": round(secs, 3),
               "warmup_s": round(warm, 2)}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if "compiled" in rates:
        out["ratios"] = {f"compiled_over_{k}": round(rates["compiled"] / v, 3) for k, v in rates.items()
                         if k != "compiled"}
    print(f"\n{out['device']}, torch {out['torch']}: DDIM-{steps}, CIFAR10 UNet, batch {batch}, {precision}")
    for r in out["rows"]:
        print(f"  {r['variant']:15s} {r['img_per_s']:10.2f} img/s   (warm-up batch {r['warmup_s']:.1f} s)")
    for k, v in out.get("ratios", {}).items():
        print(f"  {k.replace('_over_', ' / ')} = {v:.2f}x")
    save()


if __name__ == "__main__":
    main()
