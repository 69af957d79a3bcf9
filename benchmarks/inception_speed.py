"""FID Inception feature extraction, images/s: `deme eval`'s path before issue 28 (clean-fid's `get_files_features`
with the TorchScript file run as is) against today's (`features.files_features`: clean-fid's resizer, batches stacked
once, and the network rebuilt by engine/inception.py), side by side in one process on the same images.

Each variant computes the features of the same real images (Fashion-MNIST test images from assets/, 16 px, resized to
299 the mode's way) in both modes, `--repeats` times, interleaved (before, after, after, before, ...) so that load
from other processes falls on both alike. It reports the median images/s (wall clock) and images per process-CPU-
second, their ratios, the largest feature difference, and the load average before and after.

    python benchmarks/inception_speed.py [--num-images 64] [--batch-size 64] [--repeats 3] [--save FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "assets" / "fashion-mnist" / "test"
VARIANTS = ("before", "after")


def load(mode: str, variant: str):
    """(features of a list of files, seconds to load): "before" is clean-fid's get_files_features with the
    TorchScript file run as is (what `deme eval` ran before); "after" is `features.files_features` with the
    extractor `deme eval` loads now."""
    import torch

    from deme_cli.engine import features

    t0 = time.perf_counter()
    if variant == "after":
        ext = features.load_extractor(None, mode, torch.device("cpu"))
        return (lambda files, bs: features.files_features(files, ext, mode, bs)), time.perf_counter() - t0
    real = features.fast_network
    features.fast_network = lambda net: (net, "torchscript")
    try:
        ext = features.load_extractor(None, mode, torch.device("cpu"))
    finally:
        features.fast_network = real
    from cleanfid import fid

    return (lambda files, bs: fid.get_files_features(list(files), model=ext.fn, num_workers=0, batch_size=bs,
                                                     device=torch.device("cpu"), mode=mode, verbose=False)), \
        time.perf_counter() - t0


def timed(files, run, batch_size: int):
    w0, c0 = time.perf_counter(), time.process_time()
    feats = run(files, batch_size)
    return feats, time.perf_counter() - w0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="eval.batch_size (its default: 64)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["clean", "legacy_pytorch"])
    ap.add_argument("--save", type=Path, help="write the results as JSON here (e.g. benchmarks/results/...)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from deme_cli.engine.features import image_files

    files = image_files(IMAGES)[:args.num_images]
    load_before = [round(x, 2) for x in os.getloadavg()]
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "host": platform.processor() or
              platform.machine(), "images": f"{len(files)} Fashion-MNIST test images (assets/, 16 px)",
              "batch_size": args.batch_size, "repeats": args.repeats, "modes": {}}
    for mode in args.modes:
        exts = {v: load(mode, v) for v in VARIANTS}
        for v in VARIANTS:
            timed(files[:2], exts[v][0], args.batch_size)              # warm-up (TorchScript profiles its 1st runs)
        runs = {v: [] for v in VARIANTS}
        feats = {}
        for k in range(args.repeats):
            for v in (VARIANTS if k % 2 == 0 else VARIANTS[::-1]):
                feats[v], wall, cpu = timed(files, exts[v][0], args.batch_size)
                runs[v].append({"seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
                                "load_average_1min": round(os.getloadavg()[0], 2)})
        row = {"max_abs_feature_difference": float(np.abs(feats["after"] - feats["before"]).max()),
               "largest_feature": float(np.abs(feats["before"]).max())}
        for v in VARIANTS:
            row[v] = {"load_seconds": round(exts[v][1], 2), "runs": runs[v],
                      "images_per_s": round(len(files) / statistics.median(r["seconds"] for r in runs[v]), 3),
                      "images_per_cpu_s": round(len(files) / statistics.median(r["cpu_seconds"] for r in runs[v]),
                                                3)}
        row["ratio"] = round(row["after"]["images_per_s"] / row["before"]["images_per_s"], 2)
        row["ratio_by_cpu_time"] = round(row["after"]["images_per_cpu_s"] / row["before"]["images_per_cpu_s"], 2)
        row["ratios_per_repeat"] = [round(a["seconds"] / b["seconds"], 2) for a, b in zip(runs["before"], runs["after"])]
        report["modes"][mode] = row
        print(f"{mode:<15} before {row['before']['images_per_s']:6.2f} img/s   after "
              f"{row['after']['images_per_s']:6.2f} img/s   ratio {row['ratio']:.2f}x (per repeat "
              f"{row['ratios_per_repeat']}, by CPU time {row['ratio_by_cpu_time']:.2f}x)   max |feature diff| "
              f"{row['max_abs_feature_difference']:.1e}", flush=True)
    report["load_average"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    print(f"load average (1, 5, 15 min) before {load_before}, after {report['load_average']['after']} on "
          f"{os.cpu_count()} cores; torch threads {report['threads']}")
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
