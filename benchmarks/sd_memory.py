"""Memory of one DeMe training step on the Stable Diffusion v1 UNet, and the projections' share of its parameters.

    python benchmarks/sd_memory.py                          # SD v1 UNet, the batch of recipes/sd-coco30k.toml
    python benchmarks/sd_memory.py --arch tiny --device cpu # the test suite's tiny UNet: checks the step on a CPU

The UNet is built from the SD v1.4 config with random weights (no download). Printed:
- the projection parameters (4 down blocks, mid block, 4 up blocks; C x C each) as a fraction of UNet + projections
  (the paper says 1.06%, which this placement reproduces: 9,216,000 / (859.52 M + 9.216 M));
- the peak memory of one DeMe optimizer step (student with projections + frozen teacher, Eq. 5 loss, AdamW, the
  recipe's mixed precision) with and without gradient checkpointing: torch.cuda.max_memory_allocated on CUDA, the
  process's peak RSS on the CPU (each setting in a fresh process). The SD v1 step needs about 17 GB + activations in
  fp32 on a CPU; it runs there only with --cpu-step and enough free memory, else it is reported as skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1024 ** 3

# CompVis/stable-diffusion-v1-4 unet/config.json (the values that differ from diffusers' defaults)
SD_V1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                    "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD_V1_TEXT = (77, 768)        # text embeddings per prompt: tokens x width (CLIP ViT-L/14 text encoder)
# the tiny UNet of tests/conftest.py (build_tiny_sd): exercises the same code in seconds
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_TEXT = (16, 32)
ARCHS = {"sd-v1": (SD_V1_UNET, SD_V1_TEXT), "tiny": (TINY_UNET, TINY_TEXT)}


def parameter_counts(unet_config: dict) -> dict:
    """UNet and projection parameter counts (the UNet built on the meta device: no memory, no init cost)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from deme_cli.engine.models import projection_channels

    with init_empty_weights():
        unet = UNet2DConditionModel(**unet_config)
    n_unet = sum(p.numel() for p in unet.parameters())
    channels = projection_channels(unet.config)
    n_proj = sum(c * c for part in channels.values() for c in part)
    return {"unet_params": n_unet, "projection_params": n_proj, "projections": sum(map(len, channels.values())),
            "channels": channels, "fraction_percent": 100.0 * n_proj / (n_unet + n_proj)}


def static_bytes(n_unet: int, n_proj: int, teacher_bytes_per_param: int) -> dict:
    """Weights, gradients and AdamW moments of the fp32 student + the frozen teacher, before activations."""
    student = 4 * (n_unet + n_proj)
    return {"student_weights": student, "gradients": student, "adamw_moments": 2 * student,
            "ema": student, "teacher": teacher_bytes_per_param * n_unet}


def one_step(arch: str, batch: int, resolution_latent: int, checkpointing: bool, device: str, precision: str,
             steps: int = 2) -> dict:
    """Peak memory over `steps` DeMe optimizer steps (the first allocates AdamW's moments)."""
    import copy
    import resource
    from contextlib import nullcontext

    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from deme_cli.engine.models import wrap
    from deme_cli.engine.loss import deme_loss
    from deme_cli.engine.trainer import EMA

    unet_cfg, (tokens, width) = ARCHS[arch]
    dev = torch.device(device)
    torch.manual_seed(0)
    base = UNet2DConditionModel(**unet_cfg)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    teacher = copy.deepcopy(base).to(dev)
    if dtype is not None:  # as train.py: the frozen teacher's weights already in the autocast dtype
        teacher.to(dtype)
    teacher.eval().requires_grad_(False)
    student = wrap(base, projection=True).to(dev).train()
    if checkpointing:
        student.unet.enable_gradient_checkpointing()
    named = list(student.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6)
    ema = EMA(named, 0.9999, 0.75)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    autocast = (lambda: torch.autocast(dev.type, dtype=dtype)) if dtype is not None else nullcontext
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else None
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        x0 = torch.randn(batch, 4, resolution_latent, resolution_latent, device=dev)
        c = torch.randn(batch, tokens, width, device=dev)
        t = torch.randint(0, 1000, (batch,), device=dev)
        loss, _, _ = deme_loss(student, teacher, sched, x0, torch.randn_like(x0), t, {"encoder_hidden_states": c},
                               1.0, autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(params)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"checkpointing": checkpointing, "batch": batch, "latent": resolution_latent, "device": device,
           "precision": precision, "step_s": times[-1], "loss": loss.item()}
    if dev.type == "cuda":
        out.update(peak_bytes=torch.cuda.max_memory_allocated(), before_step_bytes=before,
                   metric="torch.cuda.max_memory_allocated", gpu=torch.cuda.get_device_name())
    else:
        out.update(peak_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, metric="peak RSS")
    return out


def _child(q, kw):
    try:
        q.put(one_step(**kw))
    except Exception as e:  # reported, not raised: the other setting may still fit
        q.put({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})


def measure(kw: dict) -> dict:
    """CUDA: in this process (peak stats are reset per setting). CPU: in a fresh process, for a clean peak RSS."""
    if kw["device"] == "cuda":
        import torch

        try:
            return one_step(**kw)
        except torch.cuda.OutOfMemoryError:
            return {"error": "CUDA out of memory", "checkpointing": kw["checkpointing"]}
        finally:
            torch.cuda.empty_cache()
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(q, kw))
    p.start()
    p.join()
    return q.get() if not q.empty() else {"error": f"process died (exit {p.exitcode}; out of memory?)"}


def mem_available() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "sd-coco30k.toml"), help="batch size and resolution")
    ap.add_argument("--arch", default="sd-v1", choices=sorted(ARCHS))
    ap.add_argument("--batch-size", type=int, help="default: the recipe's train.batch_size (CPU: 1)")
    ap.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    ap.add_argument("--cpu-step", action="store_true", help="run the SD v1 step on the CPU if memory allows")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    import torch

    from deme_cli.engine.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    unet_cfg, _ = ARCHS[args.arch]
    res = {"arch": args.arch, "recipe": args.recipe}

    # Parameters.
    pc = parameter_counts(unet_cfg)
    res["parameters"] = pc
    print(f"{args.arch} UNet: {pc['unet_params']:,} parameters; {pc['projections']} projections "
          f"{pc['channels']['down']} | {pc['channels']['mid']} | {pc['channels']['up']}: "
          f"{pc['projection_params']:,} parameters = {pc['fraction_percent']:.3f}% of UNet + projections "
          f"(paper: 1.06%)")

    # One DeMe step, with and without gradient checkpointing.
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    precision = recipe.train.mixed_precision
    precision = ("bf16" if device == "cuda" else "no") if precision == "auto" else precision
    vae_scale = 8 if args.arch == "sd-v1" else 2
    latent = recipe.data.resolution // vae_scale if args.arch == "sd-v1" else unet_cfg["sample_size"]
    batch = args.batch_size or (recipe.train.batch_size if device == "cuda" else 1)
    st = static_bytes(pc["unet_params"], pc["projection_params"], 2 if precision in ("bf16", "fp16") else 4)
    res["static_bytes"] = st
    print(f"static memory (fp32 student, gradients, AdamW, EMA; {'fp32' if precision == 'no' else precision} "
          f"teacher): "
          + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in st.items()) + f"; total {sum(st.values()) / GiB:.2f} GiB")
    need = sum(st.values()) * 1.3
    if device == "cpu" and args.arch == "sd-v1" and not (args.cpu_step and mem_available() > need):
        res["steps"] = "skipped"
        print(f"DeMe step skipped on the CPU: it needs about {need / GiB:.0f} GiB (available "
              f"{mem_available() / GiB:.0f} GiB){'' if args.cpu_step else '; pass --cpu-step to try'}; run it on "
              f"CUDA for the recipe's batch size")
    else:
        res["steps"] = []
        print(f"one DeMe step ({device}, {precision}, batch {batch}, latents {latent}x{latent}):")
        for ckpt in (False, True):
            r = measure(dict(arch=args.arch, batch=batch, resolution_latent=latent, checkpointing=ckpt, device=device,
                             precision=precision))
            r.setdefault("checkpointing", ckpt)
            res["steps"].append(r)
            label = "with" if ckpt else "without"
            if "error" in r:
                print(f"  {label:>7} gradient checkpointing: {r['error']}")
            else:
                print(f"  {label:>7} gradient checkpointing: peak {r['peak_bytes'] / GiB:.2f} GiB ({r['metric']}), "
                      f"{r['step_s']:.2f} s/step, {batch / r['step_s']:.1f} img/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
