"""Pretrain the small Fashion-MNIST DDPM that `recipes/quickstart.toml` finetunes (assets/fmnist-ddpm).

Plain diffusers + torch: a UNet2DModel (1 channel, 16 x 16) trained with the DDPM epsilon loss on all 60,000
Fashion-MNIST training images (Debian package `dataset-fashion-mnist`, resized 28 -> 16 with deme's own transform),
T = 1000, linear betas. The EMA of the weights (warm-up decay min(max, 1 - (1 + k)^-power)) is what gets saved, as a
DDPMPipeline folder (safetensors).

    python benchmarks/fashion-mnist/pretrain.py --out runs/fmnist-base-2250              # stage 1: the defaults
    python benchmarks/fashion-mnist/pretrain.py --init runs/fmnist-base-2250 --steps 24000 \
        --lr-schedule cosine --checkpoint-every 1000 --log-every 100 --out assets/fmnist-ddpm   # stage 2 (annealing)

The shipped asset is stage 2's EMA (benchmarks/fashion-mnist/README.md has both stages' settings and costs).

Writes, under --work: loss.csv (step, mean loss of the last --log-every steps, lr, EMA decay, seconds),
checkpoint/ (resumable: re-running the same command continues from it), grid-<step>.png (DDIM-50 samples from the EMA
weights); and the pipeline under --out with grid.png and loss.csv next to it. Every random draw is a pure function of
(--seed, step), made on the CPU, so a resumed run continues the run it stopped. It trains on CUDA when available
(`--device`); `--image-dirs DIR...` reads already-resized PNGs (make_assets.py's folders) instead of the IDX files;
`--init` starts from a pipeline's weights, `--lr-schedule cosine` decays the lr to `--min-lr` at the last step.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402

UNET = dict(                                        # 1.06M parameters, 4.3 MB in fp32
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D"),   # 16 -> 8 -> 4
    up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    add_attention=True,                             # self-attention only in the mid block, at 4 x 4
    norm_num_groups=32,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=fmnist.DEFAULT_DIR, help="folder with the IDX .gz files")
    p.add_argument("--image-dirs", type=Path, nargs="+", default=None,
                   help="train on these folders of grayscale PNGs at --resolution instead (make_assets.py's train/ "
                        "and holdout/ hold the same 60,000 images, already resized), e.g. on a machine without "
                        "the Debian package")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CUDA when available; the random draws are made on the CPU either way")
    p.add_argument("--out", type=Path, default=Path("assets/fmnist-ddpm"), help="pipeline folder written at the end")
    p.add_argument("--work", type=Path, default=Path("runs/fmnist-pretrain"), help="checkpoint, loss log, grids")
    p.add_argument("--resolution", type=int, default=16, help="pixels (28 -> resolution, PIL bilinear)")
    p.add_argument("--steps", type=int, default=2250, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="images per step")
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate after the warm-up")
    p.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up, steps")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant",
                   help="after the warm-up: constant, or cosine decay from --lr to --min-lr at the last step")
    p.add_argument("--min-lr", type=float, default=0.0, help="cosine: the learning rate at the last step")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this pipeline's UNet weights (e.g. assets/fmnist-ddpm) instead of a random "
                        "init; the EMA starts from them too (a fresh optimizer: the pipeline holds no AdamW state)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema-max-decay", type=float, default=0.9995, help="EMA decay cap")
    p.add_argument("--ema-power", type=float, default=0.75, help="EMA warm-up power")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, noise, timesteps and init")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=50, help="steps per loss.csv row")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints and grids")
    p.add_argument("--grid-steps", type=int, default=50, help="DDIM steps of the sample grids")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (after a checkpoint) once this much wall-clock time has passed in this process; 0: off")
    return p.parse_args(argv)


def ema_decay(k: int, max_decay: float, power: float) -> float:
    """Decay of EMA update k (0-based): min(max_decay, 1 - (1 + k)^-power); update 0 copies the weights."""
    return min(max_decay, 1.0 - (1.0 + k) ** -power)


def learning_rate(step: int, args) -> float:
    """lr of optimizer step `step` (0-based): linear warm-up, then constant or cosine down to --min-lr."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if args.lr_schedule == "constant" or step < args.warmup:
        return args.lr * warm
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def load_images(dirs: list[Path], res: int) -> np.ndarray:
    """uint8 (N, res, res) from folders of PNGs, sorted by name within each folder, folders in the given order."""
    from PIL import Image

    files = [f for d in dirs for f in sorted(Path(d).glob("*.png"))]
    if not files:
        raise SystemExit(f"no PNG images in {', '.join(map(str, dirs))}")
    out = np.stack([np.asarray(Image.open(f).convert("L")) for f in files])
    if out.shape[1:] != (res, res):
        raise SystemExit(f"images are {out.shape[1]} x {out.shape[2]} px, not --resolution {res}")
    return out


def sample_grid(unet, steps: int, path: Path, n: int = 64, seed: int = 1234) -> None:
    """DDIM (eta 0) samples of `unet`, an 8 x 8 grid scaled up 4x (nearest), grayscale PNG."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler
    from PIL import Image

    sched = DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=1000).config)
    sched.set_timesteps(steps)
    res = unet.config.sample_size
    dev = next(unet.parameters()).device
    x = torch.randn(n, 1, res, res, generator=torch.Generator().manual_seed(seed)).to(dev)
    unet.eval()
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    imgs = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu().numpy()
    side = int(math.ceil(math.sqrt(n)))
    grid = np.zeros((side * res, side * res), np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, side)
        grid[r * res:(r + 1) * res, c * res:(c + 1) * res] = im
    Image.fromarray(grid).resize((side * res * 4,) * 2, Image.NEAREST).save(path)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(args.threads)
    t_start = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "args.json").write_text(json.dumps(vars(args), indent=2, default=str) + "\n")

    # Load dataset.
    if args.image_dirs:
        x_all = load_images(args.image_dirs, args.resolution)
    else:
        x_all, _ = fmnist.load("train", args.data_dir)
        x_all = fmnist.resize(x_all, args.resolution)
    x_all = torch.from_numpy(x_all).float().div_(127.5).sub_(1.0).unsqueeze(1)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    n_data = len(x_all)
    print(f"data: {tuple(x_all.shape)} in [{x_all.min():.0f}, {x_all.max():.0f}] ({time.time() - t_start:.1f} s)", flush=True)

    # Construct network.
    torch.manual_seed(args.seed)
    unet = UNet2DModel(**{**UNET, "sample_size": args.resolution})
    if args.init is not None:
        unet = UNet2DModel.from_pretrained(args.init, subfolder="unet")
        if unet.config.sample_size != args.resolution:
            raise SystemExit(f"--init {args.init} makes {unet.config.sample_size} px images, not --resolution "
                             f"{args.resolution}")
    ema_unet = UNet2DModel.from_config(unet.config)
    ema_unet.load_state_dict(unet.state_dict())
    ema_unet.requires_grad_(False)
    unet.to(device)
    ema_unet.to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    params, ema_params = list(unet.parameters()), list(ema_unet.parameters())
    print(f"unet: {sum(p.numel() for p in params) / 1e6:.3f}M parameters", flush=True)

    # Resume training from previous checkpoint.
    ckpt = args.work / "checkpoint"
    step = 0
    if (ckpt / "state.json").is_file():
        unet.load_state_dict(load_file(str(ckpt / "unet.safetensors"), device=str(device)))
        ema_unet.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=str(device)))
        opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location=device))
        step = json.loads((ckpt / "state.json").read_text())["step"]
        print(f"resumed at step {step}", flush=True)

    def save_checkpoint():
        tmp = args.work / "checkpoint.tmp"
        tmp.mkdir(exist_ok=True)
        save_file(unet.state_dict(), str(tmp / "unet.safetensors"))
        save_file(ema_unet.state_dict(), str(tmp / "ema.safetensors"))
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")
        if ckpt.exists():
            old = args.work / "checkpoint.old"
            ckpt.rename(old)
            tmp.rename(ckpt)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(ckpt)

    # Train.
    log_path = args.work / "loss.csv"
    if step == 0 or not log_path.is_file():
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(["step", "loss", "lr", "ema_decay", "seconds"])
    steps_per_epoch = n_data // args.batch_size
    losses: list[float] = []
    t_log = time.time()
    unet.train()
    while step < args.steps:
        epoch, pos = divmod(step, steps_per_epoch)
        perm = torch.randperm(n_data, generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))
        x0 = x_all[perm[pos * args.batch_size:(pos + 1) * args.batch_size]]
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step + 1)
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
        x0, noise, t = x0.to(device), noise.to(device), t.to(device)
        lr = learning_rate(step, args)
        for group in opt.param_groups:
            group["lr"] = lr

        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        opt.step()

        # Update EMA.
        decay = ema_decay(step, args.ema_max_decay, args.ema_power)
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        step += 1
        losses.append(loss.item())

        if step % args.log_every == 0 or step == args.steps:
            with open(log_path, "a", newline="") as f:
                csv.writer(f).writerow([step, f"{np.mean(losses):.5f}", f"{lr:.3g}", f"{decay:.6f}",
                                        f"{time.time() - t_start:.1f}"])
            print(f"step {step}/{args.steps} loss {np.mean(losses):.4f} lr {lr:.2g} ema {decay:.5f} "
                  f"{(time.time() - t_log) / len(losses):.3f} s/step", flush=True)
            losses, t_log = [], time.time()
        out_of_time = args.max_minutes > 0 and time.time() - t_start > 60 * args.max_minutes
        if step % args.checkpoint_every == 0 or step == args.steps or out_of_time:
            save_checkpoint()
            sample_grid(ema_unet, args.grid_steps, args.work / f"grid-{step:06d}.png")
            unet.train()
            print(f"checkpoint and grid at step {step} ({time.time() - t_start:.0f} s)", flush=True)
        if out_of_time:
            print(f"stopping after {args.max_minutes} min; re-run the command to continue", flush=True)
            return

    # Save the EMA weights as a diffusers pipeline.
    args.out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=ema_unet.to("cpu"), scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    # save_pretrained saves the module it is given (the EMA one); check what it wrote against the EMA state, tensor by
    # tensor, since a library call may ignore what it does not know
    saved = load_file(str(args.out / "unet" / "diffusion_pytorch_model.safetensors"))
    ema_sd = ema_unet.state_dict()
    if set(saved) != set(ema_sd) or not all(torch.equal(saved[k], ema_sd[k].cpu()) for k in ema_sd):
        raise SystemExit(f"{args.out}/unet does not hold the EMA weights")
    sample_grid(ema_unet, args.grid_steps, args.out / "grid.png")
    (args.out / "loss.csv").write_bytes(log_path.read_bytes())
    # what the init itself was made from (its own pretrain.json), so the whole lineage stays with the weights
    init = None
    if args.init is not None:
        f = Path(args.init) / "pretrain.json"
        init = {"path": str(args.init), "pretrain": json.loads(f.read_text()) if f.is_file() else None}
    (args.out / "pretrain.json").write_text(json.dumps(
        {"script": "benchmarks/fashion-mnist/pretrain.py", "steps": step, "weights": "ema",
         "args": {k: v for k, v in vars(args).items() if k not in ("out", "work", "data_dir", "max_minutes", "init")},
         "init": init, "unet": UNET, "torch": torch.__version__, "device": str(device)}, indent=2, default=str)
        + "\n")
    print(f"saved {args.out} ({time.time() - t_start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
