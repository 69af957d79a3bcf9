"""Peak memory and time of `deme merge` on N range models of the google/ddpm-ema-church-256 architecture.

Builds the architecture from its config with random weights (about 114M parameters, no download), writes a base
pipeline and max(N) perturbed range models (with projections) into a folder, then merges the first N of them with each
method (task arithmetic, TIES, DARE at the recipe's default density) in a fresh Python process each, and reports that
process's peak RSS (VmHWM, the high-water mark of its own memory; ru_maxrss is not used: Linux carries it over from the
parent through fork and exec, so a child of a parent that built the models reported the parent's size) over the size
of one model, above two floors: its RSS after importing torch and diffusers (`import diffusers` is lazy: the floor of
the 2.44 models of issue 28) and after also importing diffusers' UNet classes (which any merge imports); plus the
merge time (wall clock, and the child's CPU time including its ~10 s of imports, which depends less on other load).
Weights: the release's [0.1, 0.1, 0.2, 0.5] for N = 4, 1/N otherwise.

`--before DIR` also runs each merge with the code in DIR (a checkout of an earlier commit, e.g. main before issue
28: `git archive main | tar -x -C DIR`), side by side (interleaved), and checks that both wrote the same merged
weights, every tensor bit for bit. `--naive` also runs an in-memory task-arithmetic merge that loads all N + 1 state
dicts (safetensors.torch.load_file) first, for contrast.

    python benchmarks/merge_memory.py [--n 2 4 8] [--methods task_arithmetic ties dare] [--before DIR] [--naive]
                                      [--keep DIR] [--json] [--save benchmarks/results/cpu-merge_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHURCH = dict(sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
              block_out_channels=(128, 128, 256, 256, 512, 512),
              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)
RELEASE_WEIGHTS = [0.1, 0.1, 0.2, 0.5]  # the release's for N = 4, low t first
METHODS = ("task_arithmetic", "ties", "dare")


def weights_for(n: int) -> list[float]:
    return RELEASE_WEIGHTS if n == len(RELEASE_WEIGHTS) else [1.0 / n] * n

# The child: import the stack, note the RSS floor, merge, report. Peak RSS is the kernel's high-water mark.
CHILD = r"""
import json, resource, sys, time
def rss_kib(field="VmRSS"):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
import threading
peaks = {"RssAnon": 0, "RssFile": 0}
def sample():  # the high-water marks of anonymous and file-backed (memory-mapped) pages, every 10 ms
    while True:
        for k in peaks:
            peaks[k] = max(peaks[k], rss_kib(k))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
import torch, diffusers, safetensors.torch
from deme_cli.engine.recipe import recipe_from_dict
from deme_cli.engine.runs import RunDir
floor = rss_kib()
from diffusers import UNet2DModel   # lazy in `import diffusers`; every merge imports it
floor_unet = rss_kib()
from pathlib import Path
mode, base, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
weights = json.loads(sys.argv[4])
t0 = time.time()
if mode != "naive":  # a merge method
    from deme_cli.commands.merge import run_merge
    recipe = recipe_from_dict({"name": "bench", "model": {"pretrained": base}, "data": {"path": str(root)},
                               "ranges": {"n": len(weights)}, "merge": {"method": mode},
                               "output": {"dir": str(root)}})
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
import deme_cli
print(json.dumps({"mode": mode, "seconds": seconds, "peak_rss_kib": rss_kib("VmHWM"), "import_rss_kib": floor,
                  "code": str(Path(deme_cli.__file__).resolve().parents[1]),
                  "peak_anon_kib": peaks["RssAnon"], "peak_file_kib": peaks["RssFile"],
                  "unet_import_rss_kib": floor_unet, "cpu_seconds_total": ru.ru_utime + ru.ru_stime}))
"""


def build(workdir: Path, n: int) -> tuple[Path, Path, int, int]:
    """Base pipeline + n perturbed range models (final/, with projections). Returns (base, run root, params, bytes)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    from deme_cli.engine import models

    torch.manual_seed(0)
    unet = UNet2DModel(**CHURCH)
    base = workdir / "base"
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(base)
    params = sum(p.numel() for p in unet.parameters())
    write_range_models(unet, workdir / "run", n, base_folder=base)
    size = (base / "unet" / models.UNET_WEIGHTS).stat().st_size
    return base, workdir / "run", params, size


def write_range_models(unet, root: Path, n: int, scale: float = 1e-3, base_folder: Path = None) -> None:
    """n range models of `unet` in the run at `root` (ranges/<i>/final/, with projections), as `deme train` writes
    them (pipeline folders around the base pipeline `base_folder`): its weights (and identity projections) plus
    Gaussian noise of std `scale`; `unet` is left as it is."""
    import copy

    import torch

    from deme_cli.engine import models
    from deme_cli.engine.runs import RunDir

    h = models.unet_hash(unet)
    run = RunDir(root)
    model = models.wrap(copy.deepcopy(unet), projection=True)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(n):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(original[k] + scale * torch.randn_like(p))
        models.save_model_folder(run.final(i), model, {"range": {"index": i, "lo": 1000 * i // n,
                                                                 "hi": 1000 * (i + 1) // n},
                                                       "base_hash": h, "recipe": "bench"},
                                  base_folder=base_folder)


def measure(mode: str, base: Path, root: Path, weights: list[float], code: Path = None) -> dict:
    """Merge in a fresh process, with the deme_cli of `code` (default: this checkout)."""
    code = Path(code or Path(__file__).resolve().parents[1]).resolve()
    # `python -c` puts the working directory first on sys.path, before PYTHONPATH: run in the checkout's root
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(code)}
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(base), str(root), json.dumps(weights)],
                         capture_output=True, text=True, env=env, cwd=code)
    if out.returncode != 0:
        raise SystemExit(f"{mode} merge failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["wall_seconds_with_imports"] = time.time() - t0
    return res


def same_weights(a: Path, b: Path) -> bool:
    """Whether two merged/ folders hold the same tensors, bit for bit, in either folder layout (read one tensor at a
    time from the files pipeline_folders.folder_files finds)."""
    import torch

    from deme_cli.engine.pipeline_folders import folder_files
    from deme_cli.engine.safetensors_stream import TensorFileReader

    fa, fb = folder_files(a), folder_files(b)
    for xa, xb in [(fa.unet, fb.unet), ([fa.projection] if fa.projection else [], [fb.projection] if fb.projection
                                        else [])]:
        if bool(xa) != bool(xb):
            return False
        if not xa:
            continue
        with TensorFileReader(xa) as x, TensorFileReader(xb) as y:
            if sorted(x.keys()) != sorted(y.keys()) or any(
                    x.info(k).dtype != y.info(k).dtype or not torch.equal(x.get(k), y.get(k)) for k in x.keys()):
                return False
    return True


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def row(r: dict, size: int) -> dict:
    peak = r["peak_rss_kib"] * 1024
    floor, floor_unet = r["import_rss_kib"] * 1024, r["unet_import_rss_kib"] * 1024
    return {"code_dir": r["code"], "seconds": round(r["seconds"], 2),
            "cpu_seconds_incl_imports": round(r["cpu_seconds_total"], 1),
            "peak_rss_bytes": peak, "import_rss_bytes": floor, "unet_import_rss_bytes": floor_unet,
            "peak_anonymous_bytes": r["peak_anon_kib"] * 1024, "peak_file_backed_bytes": r["peak_file_kib"] * 1024,
            "peak_over_model": round(peak / size, 2),
            "peak_minus_imports_over_model": round((peak - floor) / size, 2),
            "peak_minus_unet_imports_over_model": round((peak - floor_unet) / size, 2),
            "load_average_before": r["load_average_before"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8], help="numbers of range models to merge")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--before", type=Path, help="also merge with the deme_cli in this folder and compare")
    ap.add_argument("--naive", action="store_true", help="also run the all-in-memory merge for contrast")
    ap.add_argument("--keep", type=Path, help="build the models here and keep them (default: a temporary folder)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--save", type=Path, help="also write the results as JSON to this file")
    args = ap.parse_args()

    import shutil

    from deme_cli.engine.runs import RunDir

    report = {"architecture": "google/ddpm-ema-church-256 (random weights)",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": f"{platform.machine()}, {os.cpu_count()} cores",
              "before": str(args.before) if args.before else None, "results": []}
    mib = 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="deme-merge-bench-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        info_file = workdir / "info.json"
        info = json.loads(info_file.read_text()) if args.keep and info_file.is_file() else None
        if info is None or info.get("n", 4) < max(args.n):  # reuse the models of an earlier run with --keep
            base, root, params, size = build(workdir, max(args.n))
            info_file.write_text(json.dumps({"base": str(base), "root": str(root), "params": params, "size": size,
                                             "n": max(args.n)}))
        else:
            base, root, params, size = Path(info["base"]), Path(info["root"]), info["params"], info["size"]
        report.update(params=params, model_bytes=size, build_seconds=round(time.time() - t0, 1))
        print(f"{report['architecture']}: {params / 1e6:.1f}M params, one model = {size / mib:.0f} MiB", flush=True)
        print(f"{'N':>2} {'mode':<16} {'code':<7} {'time s':>7} {'cpu s':>6} {'peak RSS MiB':>13} "
              f"{'(peak-imports)/model':>21} {'(peak-imports-UNet)/model':>26} {'same weights':>13}", flush=True)
        merged, aside = RunDir(root).merged, Path(workdir) / "merged-before"
        k = 0
        for n in args.n:  # methods and before/after interleaved within each N: machine load drifts
            for mode in list(args.methods) + (["naive"] if args.naive else []):
                codes = [("after", None)] + ([("before", args.before)] if args.before and mode != "naive" else [])
                out = {}
                for label, code in (codes if k % 2 == 0 else codes[::-1]):
                    load = load_average()
                    out[label] = row({**measure(mode, base, root, weights_for(n), code),
                                      "load_average_before": load}, size)
                    if code is not None and Path(out[label]["code_dir"]) != code.resolve():
                        raise SystemExit(f"the {label} merge ran the deme_cli of {out[label]['code_dir']}, not {code}")
                    if len(codes) > 1 and label == "before":
                        shutil.rmtree(aside, ignore_errors=True)
                        shutil.copytree(merged, aside)
                    elif len(codes) > 1:
                        shutil.rmtree(Path(workdir) / "merged-after", ignore_errors=True)
                        shutil.copytree(merged, Path(workdir) / "merged-after")
                k += 1
                same = same_weights(aside, Path(workdir) / "merged-after") if len(codes) > 1 else None
                for label, r in out.items():
                    report["results"].append({"n": n, "mode": mode, "code": label, "weights": weights_for(n), **r,
                                              **({"same_weights_as_before": same} if same is not None else {})})
                    print(f"{n:>2} {mode:<16} {label:<7} {r['seconds']:>7.2f} {r['cpu_seconds_incl_imports']:>6.1f} "
                          f"{r['peak_rss_bytes'] / mib:>13.0f} {r['peak_minus_imports_over_model']:>21.2f} "
                          f"{r['peak_minus_unet_imports_over_model']:>26.2f} {str(same):>13}", flush=True)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
