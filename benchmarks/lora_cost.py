"""Cost of LoRA range models against full ones, measured side by side on the same UNet and batch; and adapter sizes.

    python benchmarks/lora_cost.py --arch fmnist --quick     # CPU: the Fashion-MNIST DDPM of assets/fmnist-ddpm
    python benchmarks/lora_cost.py --arch cifar10 --quick    # CPU: the DDPM CIFAR10 UNet, random weights
    python benchmarks/lora_cost.py --arch sd                 # GPU: the SD v1.4 UNet, random weights, batch 16
    python benchmarks/lora_cost.py --sizes                   # adapter sizes only: no GPU, no download, seconds

Step cost (--arch). Two RangeTrainers built from one recipe on one base, deme.adapter = "full" and "lora" (rank
--rank, alpha --alpha, the default targets of adapters.DEFAULT_TARGETS), each stepped by RangeTrainer.train_step:
student and teacher forward, the Eq. 5 loss, AdamW, EMA, the metrics read back. Both take --warmup untimed steps,
then alternate in blocks of --block timed steps (the order swapped every block) until each has --steps, so that the
load of other processes hits both alike. The data task is replaced by one fixed random batch (FixedBatchTask: x0 in
[-1, 1]; for sd random 4x64x64 latents and 77x768 text embeddings in place of the VAE and the text encoder), so no
data loading is timed. Reported per variant:
  ms/step        median wall time of the timed steps; and the median process CPU time (on a shared CPU the steadiest)
  trainable      parameters that require grad (full: UNet + projections; lora: adapters + projections)
  grads, AdamW, EMA   bytes of the tensors themselves: the gradients as accumulated in a step (caught by hooks), the
                 optimizer state after a step, the EMA shadow
  checkpoint     bytes on disk of what RangeTrainer.save_checkpoint writes (trainable_state, EMA, optimizer, RNG)
  range folder   bytes on disk of final/ as `deme train` writes it (RangeTrainer.export of the EMA state: a full
                 folder, or lora/ in peft's format + projection.safetensors + deme.json)
  peak memory    each variant alone in a fresh process, over building its trainer and --mem-steps steps. CUDA:
                 torch.cuda.max_memory_allocated. CPU: the process's peak RSS (ru_maxrss) minus its peak after the
                 imports and loading the base UNet once (so one copy of the UNet's weights is in the baseline).
Random weights except fmnist (the real asset); timing only, nothing is learned.

Sizes (--sizes; a run with --arch adds its own UNet at --rank). The UNet built on the meta device (no memory), LoRA
injected through adapters.add_lora at each of --ranks with the default targets: adapter parameters and fp32 bytes
against the full UNet's, plus the projections (models.projection_channels: C x C per projected block output), which a
LoRA range folder holds in full too. "train state" is fp32 gradients + AdamW's two moments + EMA, 16 bytes per trained
parameter. The SD v1.4 UNet is sd_memory.SD_V1_UNET: diffusers' UNet2DConditionModel defaults (blocks, layers 2, head
dim 8, 32 groups) with sample_size 64 and cross_attention_dim 768; its count is checked against 859,520,964.

JSON: benchmarks/results/<cpu|gpu>-lora_cost-<arch>.json (--sizes: lora_cost-sizes.json), or --out.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from child_process import in_child  # noqa: E402  (benchmarks/: one measurement in a fresh process)
import sd_memory  # noqa: E402  (benchmarks/: the SD v1 and tiny SD UNet configs)
import throughput  # noqa: E402  (benchmarks/: the CIFAR10 config, device and timing helpers)

MB = 1e6
FMNIST = ROOT / "assets" / "fmnist-ddpm"
SD_V1_PARAMS = 859_520_964          # CompVis/stable-diffusion-v1-4's UNet
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

# unet: diffusers class; config: UNet kwargs (None: read from `pretrained`); tokens: text positions x width of a
# conditional UNet; batch / steps: the full run, quick_*: the CPU smoke run (--quick)
ARCHS = {
    "fmnist": dict(unet="UNet2DModel", pretrained=FMNIST, config=None, tokens=None,
                   batch=64, steps=20, quick_batch=16, quick_steps=12),
    "cifar10": dict(unet="UNet2DModel", pretrained=None, tokens=None, batch=128, steps=20, quick_batch=4,
                    quick_steps=6, config=dict(sample_size=32, in_channels=3, out_channels=3,
                                               **throughput.ARCHS["cifar10"]["config"])),
    "sd": dict(unet="UNet2DConditionModel", pretrained=None, config=sd_memory.SD_V1_UNET, tokens=sd_memory.SD_V1_TEXT,
               batch=16, steps=10, quick_batch=1, quick_steps=4, gpu_only=True),
    # the test suite's tiny SD UNet: checks the conditional path on a CPU in seconds
    "sd-tiny": dict(unet="UNet2DConditionModel", pretrained=None, config=sd_memory.TINY_UNET,
                    tokens=sd_memory.TINY_TEXT, batch=8, steps=10, quick_batch=4, quick_steps=6),
}
SIZE_ARCHS = ("sd", "cifar10", "fmnist")
VARIANTS = ("full", "lora")


def unet_config(arch: str) -> dict:
    spec = ARCHS[arch]
    if spec["config"] is not None:
        return dict(spec["config"])
    import diffusers

    return dict(getattr(diffusers, spec["unet"]).load_config(spec["pretrained"] / "unet"))


# --- sizes ---------------------------------------------------------------------------------------------------------

def lora_sizes(unet_class: str, config: dict, ranks=(4, 8, 16, 32), targets=None) -> dict:
    """Parameter counts and fp32 bytes of the UNet, its projections, and its LoRA adapters at each rank (injected by
    adapters.add_lora with `targets`, default by UNet class), the UNet built on the meta device."""
    import diffusers
    from accelerate import init_empty_weights

    from deme_cli.engine import adapters
    from deme_cli.engine.models import projection_channels
    from deme_cli.engine.recipe import DemeSection

    def build():
        with init_empty_weights():
            return getattr(diffusers, unet_class).from_config(config)

    unet = build()
    n_unet = sum(p.numel() for p in unet.parameters())
    n_proj = sum(c * c for part in projection_channels(unet.config).values() for c in part)
    out = {"unet_class": unet_class, "unet_params": n_unet, "unet_bytes_fp32": 4 * n_unet, "projection_params": n_proj,
           "projection_bytes_fp32": 4 * n_proj, "ranks": {}}
    for r in ranks:
        unet = build()
        with init_empty_weights():     # the adapters on the meta device too
            cfg = adapters.add_lora(unet, DemeSection(adapter="lora", lora_rank=r, lora_targets=targets), seed=0)
        lora = {n: p.numel() for n, p in unet.named_parameters() if ".lora_A." in n or ".lora_B." in n}
        n_lora = sum(lora.values())
        out["targets"] = sorted(cfg.target_modules)
        out["ranks"][r] = {"adapted_layers": sum(".lora_A." in n for n in lora), "adapter_params": n_lora,
                           "adapter_bytes_fp32": 4 * n_lora, "adapter_over_unet": n_lora / n_unet,
                           "folder_bytes_fp32": 4 * (n_lora + n_proj),
                           "folder_over_full": (n_lora + n_proj) / (n_unet + n_proj),
                           "train_state_bytes": 16 * (n_lora + n_proj), "full_train_state_bytes": 16 * (n_unet + n_proj)}
    return out


def sizes_table(sizes: dict) -> list[str]:
    """Markdown rows of lora_sizes results {arch: result}."""
    out = ["| UNet | params | fp32 | projections | rank | adapted layers | adapter params | adapter fp32 | "
           "adapter / UNet | range folder lora / full | train state lora / full |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, s in sizes.items():
        for r, x in s["ranks"].items():
            out.append(f"| {arch} | {s['unet_params'] / 1e6:,.2f}M | {s['unet_bytes_fp32'] / MB:,.1f} MB | "
                       f"{s['projection_params'] / 1e6:,.3f}M | {r} | {x['adapted_layers']} | "
                       f"{x['adapter_params'] / 1e6:,.3f}M | {x['adapter_bytes_fp32'] / MB:,.2f} MB | "
                       f"{100 * x['adapter_over_unet']:.2f}% | {x['folder_bytes_fp32'] / MB:,.2f} / "
                       f"{(s['unet_bytes_fp32'] + s['projection_bytes_fp32']) / MB:,.1f} MB = "
                       f"{100 * x['folder_over_full']:.2f}% | {x['train_state_bytes'] / MB:,.1f} / "
                       f"{x['full_train_state_bytes'] / MB:,.1f} MB |")
    return out


# --- the trainers --------------------------------------------------------------------------------------------------

class FixedBatchTask:
    """Stands in for the model kind's training task (kinds.py): one fixed random batch, x0 in [-1, 1] shaped like the
    UNet's input, and for a conditional UNet random text embeddings (tokens x width); no data, VAE or text encoder."""

    def __init__(self, base, unet, data, *, seed: int, device, cache_dir=None, batch_size: int = 16, tokens=None):
        import torch

        g = torch.Generator().manual_seed(seed)
        c, s = unet.config.in_channels, unet.config.sample_size
        self.x0 = (torch.rand((batch_size, c, s, s), generator=g) * 2 - 1).to(device)
        self.kwargs = {} if tokens is None else {
            "encoder_hidden_states": torch.randn((batch_size, *tokens), generator=g).to(device)}

    def dataset(self):
        return []

    def prepare(self, batch):
        return self.x0, self.kwargs


def write_pipeline(arch: str, folder: Path) -> Path:
    """The pipeline folder `deme train` would read: the asset, or a random-weight UNet and its noise schedule."""
    import torch
    import diffusers
    from diffusers import DDPMScheduler

    spec = ARCHS[arch]
    if spec["pretrained"] is not None:
        return spec["pretrained"]
    if not (folder / "unet").is_dir():
        torch.manual_seed(0)
        getattr(diffusers, spec["unet"])(**spec["config"]).save_pretrained(folder / "unet")
        DDPMScheduler(num_train_timesteps=1000, **(SD_SCHEDULE if spec["tokens"] else {})).save_pretrained(
            folder / "scheduler")
    return folder


def make_trainer(variant: str, o: dict):
    """(RangeTrainer, base) for `variant` (full | lora) of the options `o` (arch, pipe, work, batch, rank, alpha,
    device, compile), on range 0 = [LO, HI) of throughput.py."""
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.ranges import Range
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.trainer import RangeTrainer

    res = unet_config(o["arch"])["sample_size"]
    deme = {"adapter": variant, "lora_rank": o["rank"], **({"lora_alpha": o["alpha"]} if o["alpha"] else {})}
    recipe = recipe_from_dict({
        "name": "lora-cost", "seed": 0, "model": {"pretrained": o["pipe"]},
        "data": {"source": "imagefolder", "path": str(Path(o["work"]) / "unused"), "resolution": res},
        "ranges": {"n": 4}, "deme": deme, "output": {"dir": str(Path(o["work"]) / variant)},
        "train": {"steps": 10 ** 9, "batch_size": o["batch"], "device": o["device"], "compile": o["compile"]}})
    base = resolve_base(recipe.model, recipe.train.device, recipe.train.mixed_precision)
    task = functools.partial(FixedBatchTask, tokens=ARCHS[o["arch"]]["tokens"])
    base = replace(base, kind=replace(base.kind, task=task))
    trainer = RangeTrainer(base, Range(0, throughput.LO, throughput.HI), data=recipe.data, train=recipe.train,
                           deme=recipe.deme, seed=recipe.seed)
    trainer.data = throughput.FixedBatches(None)        # FixedBatchTask.prepare ignores the batch
    return trainer, base


def _tensor_bytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def state_bytes(trainer) -> dict:
    """Exact bytes of the gradients of one step (read by post-accumulate hooks during it), the optimizer's state and
    the EMA shadow; runs one train_step."""
    grads = {}
    hooks = [p.register_post_accumulate_grad_hook(lambda p: grads.__setitem__(id(p), _tensor_bytes([p.grad])))
             for p in trainer.params]
    trainer.train_step()
    for h in hooks:
        h.remove()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    trained = {n: p.numel() for n, p in trainer.unwrapped().named_parameters() if p.requires_grad}
    return {"trainable_params": sum(trained.values()),
            "projection_params": sum(v for n, v in trained.items() if n.startswith("projections.")),
            "grad_bytes": sum(grads.values()), "grad_tensors": len(grads),
            "optimizer_bytes": _tensor_bytes(t for s in opt.state.values() for t in s.values()),
            "ema_bytes": _tensor_bytes(trainer.ema.shadow) if trainer.ema is not None else 0}


def _folder_bytes(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def written_bytes(trainer, base, folder: Path) -> dict:
    """Bytes on disk of a checkpoint (RangeTrainer.save_checkpoint) and of final/ as `deme train` exports it."""
    trainer.save_checkpoint(folder / "checkpoints")
    ck = _folder_bytes(folder / "checkpoints" / f"step-{trainer.step}")
    raw, ema = trainer.final_states()
    trainer.export(folder / "final", {"weights": "ema"}, ema or raw, base.folder)
    final = _folder_bytes(folder / "final")
    return {"checkpoint_bytes": sum(ck.values()), "checkpoint_files": ck,
            "folder_bytes": sum(final.values()), "folder_files": final}


# --- peak memory, one variant per process --------------------------------------------------------------------------

def peak_memory(variant: str, o: dict, steps: int, threads: int) -> dict:
    """Peak memory of building `variant`'s trainer and `steps` train_steps, in this (fresh) process."""
    import gc
    import resource

    import torch

    import importlib
    from deme_cli.engine.base import resolve_base
    from deme_cli.engine.recipe import ModelSection

    cuda = o["device"] == "cuda"
    torch.set_num_threads(threads)
    for module in ("deme_cli.engine.trainer", "peft"):      # imported before the baseline is read
        importlib.import_module(module)
    unet = resolve_base(ModelSection(pretrained=o["pipe"]), o["device"]).load_unet()
    del unet
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer, _ = make_trainer(variant, o)
    for _ in range(steps):
        trainer.train_step()
    if cuda:
        torch.cuda.synchronize()
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "metric": "torch.cuda.max_memory_allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_bytes": peak - before, "peak_rss_bytes": peak, "baseline_rss_bytes": before,
            "metric": "process peak RSS minus the peak after imports and loading the base UNet"}


# --- timing --------------------------------------------------------------------------------------------------------

def time_interleaved(steps: dict, dev, warmup: int, n: int, block: int) -> dict:
    """{name: (wall seconds, CPU seconds) per timed step}: `warmup` untimed calls of each, then blocks of `block`
    timed calls, alternating between the step functions and swapping their order every block."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    wall = {k: [] for k in steps}
    cpu = {k: [] for k in steps}
    order = list(steps)
    while any(len(wall[k]) < n for k in steps):
        for k in order:
            for _ in range(min(block, n - len(wall[k]))):
                throughput._sync(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                steps[k]()
                throughput._sync(dev)
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        order.reverse()
    return {k: (wall[k], cpu[k]) for k in steps}


def step_table(out: dict) -> list[str]:
    """Markdown rows of a step-cost result."""
    v, ratio = out["variants"], out["ratios"]

    def mb(x):
        return "-" if x is None else f"{x / MB:,.2f}"

    peak = "peak GPU MB" if out["device_type"] == "cuda" else "peak RSS MB"
    rows = ["| variant | trainable params | ms/step wall | ms/step CPU | grads MB | AdamW MB | EMA MB | checkpoint MB | "
            f"range folder MB | {peak} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in v.items():
        label = "full" if name == "full" else f"lora r{out['rank']}"
        rows.append(f"| {label} | {r['trainable_params']:,} | {r['ms_wall']:,.1f} | {r['ms_cpu']:,.1f} | "
                    f"{mb(r['grad_bytes'])} | {mb(r['optimizer_bytes'])} | {mb(r['ema_bytes'])} | "
                    f"{mb(r['checkpoint_bytes'])} | {mb(r['folder_bytes'])} | {mb(r.get('peak_bytes'))} |")
    fmt = {k: ("-" if ratio.get(k) is None else f"{ratio[k]:.3f}") for k in
           ("trainable_params", "ms_wall", "ms_cpu", "grad_bytes", "optimizer_bytes", "ema_bytes", "checkpoint_bytes",
            "folder_bytes", "peak_bytes")}
    rows.append("| **lora / full** | " + " | ".join(f"**{x}**" for x in fmt.values()) + " |")
    return rows


def run_step_cost(args, dev) -> dict:
    import torch

    spec = ARCHS[args.arch]
    if spec.get("gpu_only") and dev.type != "cuda":
        raise SystemExit(f"--arch {args.arch} trains the full SD v1.4 UNet (about 17 GB of fp32 weights, gradients, "
                         f"AdamW and EMA before activations): run it on a GPU. On this CPU: --sizes for the adapter "
                         f"sizes, or --arch sd-tiny to check the conditional step path")
    batch = args.batch or spec["quick_batch" if args.quick else "batch"]
    n = args.steps or spec["quick_steps" if args.quick else "steps"]
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    block = args.block or (2 if args.quick else 5)
    cfg = unet_config(args.arch)
    out = {**throughput.device_info("lora_cost", dev), "command": command(), "arch": args.arch,
           "unet_class": spec["unet"], "res": cfg["sample_size"], "batch": batch, "rank": args.rank,
           "alpha": args.alpha or float(args.rank), "steps": n, "warmup": warmup, "block": block,
           "data": "one fixed random batch (FixedBatchTask)" + (", random text embeddings " + "x".join(
               map(str, spec["tokens"])) if spec["tokens"] else ""),
           "bytes_method": {"grads/AdamW/EMA": "exact, from the tensors",
                            "checkpoint/range folder": "on disk, written by RangeTrainer.save_checkpoint and "
                                                       "RangeTrainer.export (as deme train)"}}
    with tempfile.TemporaryDirectory(prefix=f"deme-lora-cost-{args.arch}-") as tmp:
        o = {"arch": args.arch, "pipe": str(write_pipeline(args.arch, Path(tmp) / "pipe")), "work": tmp,
             "batch": batch, "rank": args.rank, "alpha": args.alpha, "device": dev.type, "compile": args.compile}

        # Peak memory: each variant alone, in its own process.
        peaks = {}
        for variant in VARIANTS:
            t0 = time.perf_counter()
            peaks[variant] = in_child(peak_memory, variant, o, args.mem_steps, torch.get_num_threads())
            print(f"# peak memory, {variant}: {peaks[variant]} ({time.perf_counter() - t0:.0f} s)", flush=True)

        # Build both trainers; sizes of their trained state (one untimed step each).
        trainers, bases, rows = {}, {}, {}
        for variant in VARIANTS:
            trainers[variant], bases[variant] = make_trainer(variant, o)
            rows[variant] = state_bytes(trainers[variant])
        t = trainers["lora"]
        out.update(precision=t.acc.mixed_precision, compile=t.compiled, targets=sorted(t.lora.target_modules),
                   params_M=round(sum(p.numel() for p in trainers["full"].unwrapped().unet.parameters()) / 1e6, 3))

        # Steps, interleaved.
        times = time_interleaved({v: trainers[v].train_step for v in VARIANTS}, dev, warmup, n, block)
        for variant in VARIANTS:
            wall, cpu = times[variant]
            rows[variant].update(ms_wall=1e3 * statistics.median(wall), ms_wall_best=1e3 * min(wall),
                                 ms_cpu=1e3 * statistics.median(cpu), img_per_s=batch / statistics.median(wall),
                                 **written_bytes(trainers[variant], bases[variant], Path(tmp) / "written" / variant),
                                 **{k: peaks[variant].get(k) for k in ("peak_bytes", "peak_rss_bytes", "error")
                                    if k in peaks[variant]})
            rows[variant]["peak_metric"] = peaks[variant].get("metric")
    out["variants"] = rows
    out["ratios"] = {k: (rows["lora"][k] / rows["full"][k] if rows["full"].get(k) and rows["lora"].get(k) is not None
                         else None)
                     for k in ("trainable_params", "ms_wall", "ms_wall_best", "ms_cpu", "grad_bytes", "optimizer_bytes",
                               "ema_bytes", "checkpoint_bytes", "folder_bytes", "peak_bytes")}
    # the meta-device count must be what the trainer trains
    s = lora_sizes(spec["unet"], cfg, (args.rank,))
    out["sizes"] = s
    counted = s["ranks"][args.rank]["adapter_params"] + s["projection_params"]
    if counted != rows["lora"]["trainable_params"]:
        print(f"WARNING: the size report counts {counted:,} LoRA + projection parameters, the trainer trains "
              f"{rows['lora']['trainable_params']:,}", file=sys.stderr)
    return out


# --- main ----------------------------------------------------------------------------------------------------------

def command() -> str:
    return "python benchmarks/lora_cost.py " + shlex.join(sys.argv[1:])


def default_out(dev, what: str) -> Path:
    import torch

    tag = "cpu" if dev.type == "cpu" else (re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()
                                                  .replace("nvidia", "")).strip("-") or "gpu")
    return HERE / "results" / (f"lora_cost-{what}.json" if what == "sizes" else f"{tag}-lora_cost-{what}.json")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=ARCHS, default="fmnist", help="the UNet of the step-cost run")
    ap.add_argument("--sizes", action="store_true", help="only the size report (sd, cifar10, fmnist; no steps)")
    ap.add_argument("--ranks", default="4,8,16,32", help="--sizes: comma-separated LoRA ranks")
    ap.add_argument("--rank", type=int, default=16, help="deme.lora_rank of the lora variant (recipe default 16)")
    ap.add_argument("--alpha", type=float, help="deme.lora_alpha (default: the rank, scale 1)")
    ap.add_argument("--batch", type=int, help="override the architecture's batch size")
    ap.add_argument("--quick", action="store_true", help="CPU-sized: small batch, few steps")
    ap.add_argument("--steps", type=int, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant first (default 5; quick: 2)")
    ap.add_argument("--block", type=int, help="timed steps per variant before switching (default 5; quick: 2)")
    ap.add_argument("--mem-steps", type=int, default=3, help="steps of each peak-memory process")
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="train.compile (auto: CUDA only)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (default 1 on the CPU)")
    ap.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/...)")
    args = ap.parse_args()

    dev = throughput.bench_device(args.device, args.threads)
    T0 = time.perf_counter()
    if args.sizes:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
        sizes = {arch: lora_sizes(ARCHS[arch]["unet"], unet_config(arch), ranks) for arch in SIZE_ARCHS}
        if sizes["sd"]["unet_params"] != SD_V1_PARAMS:
            raise SystemExit(f"the SD v1.4 config builds {sizes['sd']['unet_params']:,} parameters, not "
                             f"{SD_V1_PARAMS:,}: check sd_memory.SD_V1_UNET against the model's unet/config.json")
        out = {**throughput.device_info("lora_cost_sizes", dev), "command": command(), "ranks": ranks, "sizes": sizes}
        lines = [f"**LoRA adapter sizes** (UNets on the meta device, adapters.add_lora with the default targets; fp32; "
                 f"torch {out['torch']}, diffusers {out['diffusers']}), `{out['command']}`:", "",
                 *sizes_table(sizes), "",
                 *(f"- {arch}: targets {', '.join(s['targets'])}" for arch, s in sizes.items()),
                 f"- sd: the SD v1.4 UNet ({SD_V1_PARAMS:,} parameters, checked). Range folder = adapters + "
                 f"projections (lora) or UNet + projections (full); train state = fp32 grads + AdamW moments + EMA "
                 f"(16 bytes per trained parameter; its ratio is the range folder's)."]
    else:
        out = run_step_cost(args, dev)
        v = out["variants"]
        peak = ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else
                "process peak RSS minus the peak after imports and loading the base UNet (each variant in its own "
                "process)")
        lines = [f"**LoRA vs full DeMe step**, {args.arch} ({out['unet_class']}, {out['params_M']}M params) batch "
                 f"{out['batch']} @ {out['res']}px, lora rank {out['rank']} alpha {out['alpha']:g} on "
                 f"{', '.join(out['targets'])}; {out['device']}, torch {out['torch']}, diffusers {out['diffusers']}, "
                 f"precision {out['precision']}, compile {out['compile']}; median of {out['steps']} interleaved "
                 f"RangeTrainer.train_step calls per variant after {out['warmup']} warm-up; `{out['command']}`:", "",
                 *step_table(out), "",
                 f"- peak memory: {peak}" + "".join(f"; {k}: {r['error']}" for k, r in v.items() if r.get("error")),
                 "- grads / AdamW / EMA: exact tensor bytes; checkpoint and range folder: bytes on disk as written by "
                 "RangeTrainer.save_checkpoint and the final/ export (models.save_model_folder, "
                 "adapters.save_lora_folder)",
                 f"- lora trains {v['lora']['trainable_params'] - v['lora']['projection_params']:,} adapter + "
                 f"{v['lora']['projection_params']:,} projection parameters; data: {out['data']}"]
    out["markdown"] = "\n".join(lines)
    out["total_s"] = round(time.perf_counter() - T0, 1)
    print("\n" + out["markdown"])
    path = args.out or default_out(dev, "sizes" if args.sizes else args.arch)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
