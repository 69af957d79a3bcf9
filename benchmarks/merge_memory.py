"""Peak memory and time of `deme merge` on four range models of the google/ddpm-ema-church-256 architecture.

Builds the architecture from its config with random weights (about 114M parameters, no download), writes a base
pipeline and four perturbed range models (with projections) into a temporary folder, then merges them with
weights [0.1, 0.1, 0.2, 0.5] in a fresh Python process and reports that process's peak RSS (ru_maxrss), its RSS after
importing torch and diffusers (the floor any merge pays), the merge time (wall clock, and the child's CPU time including
its ~10 s of imports, which depends less on other load), and the size of one model. For contrast,
`--naive` also runs an in-memory merge that loads all N + 1 state dicts (safetensors.torch.load_file) first.

    python benchmarks/merge_memory.py [--naive] [--keep DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHURCH = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(128, 128, 256, 256, 512, 512),
              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
N = 4
WEIGHTS = [0.1, 0.1, 0.2, 0.5]  # the release's, low t first

# The child: import the stack, note the RSS floor, merge, report. Peak RSS is the kernel's high-water mark.
CHILD = r"""
import json, resource, sys, time
def rss_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
import torch, diffusers, safetensors.torch
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir
floor = rss_kib()
from pathlib import Path
mode, base, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
weights = json.loads(sys.argv[4])
t0 = time.time()
if mode == "streaming":
    from deme_cli.commands.merge import run_merge
    recipe = recipe_from_dict({"name": "bench", "model": {"pretrained": base}, "data": {"path": str(root)},
                               "ranges": {"n": len(weights)}, "output": {"dir": str(root)}})
    run_merge(recipe, RunDir(root), weights=weights, force=True)
else:  # naive: every state dict in memory at once
    from safetensors.torch import load_file, save_file
    run = RunDir(root)
    theta = load_file(f"{base}/unet/diffusion_pytorch_model.safetensors")
    thetas = [load_file(str(run.final(i) / "unet" / "diffusion_pytorch_model.safetensors")) for i in range(len(weights))]
    merged = {k: (v + sum(w * (th[k] - v) for w, th in zip(weights, thetas))).contiguous() for k, v in theta.items()}
    save_file(merged, f"{root}/naive.safetensors")
seconds = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_kib": ru.ru_maxrss, "import_rss_kib": floor,
                  "cpu_seconds_total": ru.ru_utime + ru.ru_stime}))
"""


def build(workdir: Path) -> tuple[Path, Path, int, int]:
    """Base pipeline + N perturbed range models (final/, with projections). Returns (base, run root, params, bytes)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from deme_cli.engine import models
    from deme_cli.engine.runs import RunDir

    torch.manual_seed(0)
    unet = UNet2DModel(**CHURCH)
    base = workdir / "base"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(base)
    h = models.unet_hash(unet)
    params = sum(p.numel() for p in unet.parameters())
    run = RunDir(workdir / "run")
    model = models.wrap(unet, projection=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(N):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(original[k] + 1e-3 * torch.randn_like(p))
        models.save_model_folder(run.final(i), model, {"range": {"index": i, "lo": 250 * i, "hi": 250 * (i + 1)},
                                                       "base_hash": h, "recipe": "bench"})
    size = (base / "unet" / models.UNET_WEIGHTS).stat().st_size
    return base, run.root, params, size


def measure(mode: str, base: Path, root: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(base), str(root), json.dumps(WEIGHTS)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{mode} merge failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds_with_imports"] = time.time() - t0
    res["children_maxrss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res["children_maxrss_before_kib"] = before
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--naive", action="store_true", help="also run the all-in-memory merge for contrast")
    ap.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="deme-merge-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        if args.keep and (workdir / "info.json").is_file():  # models built by an earlier run with --keep
            info = json.loads((workdir / "info.json").read_text())
            base, root, params, size = Path(info["base"]), Path(info["root"]), info["params"], info["size"]
        else:
            base, root, params, size = build(workdir)
            (workdir / "info.json").write_text(json.dumps({"base": str(base), "root": str(root), "params": params,
                                                           "size": size}))
        build_s = time.time() - t0
        rows = [measure("streaming", base, root)] + ([measure("naive", base, root)] if args.naive else [])
    mib = 1024 * 1024
    report = {"architecture": "google/ddpm-ema-church-256 (random weights)", "params": params, "n_ranges": N,
              "weights": WEIGHTS, "model_bytes": size, "build_seconds": round(build_s, 1), "results": []}
    for r in rows:
        peak = r["peak_rss_kib"] * 1024
        floor = r["import_rss_kib"] * 1024
        report["results"].append({"mode": r["mode"], "seconds": round(r["seconds"], 2),
                                  "cpu_seconds_incl_imports": round(r["cpu_seconds_total"], 1),
                                  "peak_rss_bytes": peak, "import_rss_bytes": floor,
                                  "peak_over_model": round(peak / size, 2),
                                  "peak_minus_imports_over_model": round((peak - floor) / size, 2)})
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{report['architecture']}: {params / 1e6:.1f}M params, one model = {size / mib:.0f} MiB, N = {N}, "
          f"weights {WEIGHTS}")
    print(f"{'mode':<10} {'time s':>7} {'cpu s':>6} {'peak RSS MiB':>13} {'after imports MiB':>18} {'peak/model':>11} "
          f"{'(peak-imports)/model':>21}")
    for r in report["results"]:
        print(f"{r['mode']:<10} {r['seconds']:>7.2f} {r['cpu_seconds_incl_imports']:>6.1f} "
              f"{r['peak_rss_bytes'] / mib:>13.0f} "
              f"{r['import_rss_bytes'] / mib:>18.0f} {r['peak_over_model']:>11.2f} "
              f"{r['peak_minus_imports_over_model']:>21.2f}")


if __name__ == "__main__":
    main()
