"""How the weight search's and eval's costs grow: seconds against the number of candidates and of images per
candidate (`deme merge --search`), and against the number of images scored (`deme eval`), each series measured side by
side in one process on the Fashion-MNIST quickstart model (assets/fmnist-ddpm, 1.06M parameters, 16 px).

search: N = 4 range models (the base plus Gaussian noise, with projections, as benchmarks/merge_memory.py writes
    them), merge.search = "scaled" with the uniform shape at C - 1 scales (C candidates with theta), objective kid
    (DDIM-10 samples of each candidate through the FID Inception, KID against 64 held-out training images, whose
    features a first, unrecorded search caches). C in --candidates at --base-images images per candidate, and images
    per candidate in --images at C = --base-candidates.
eval: `deme eval` of a sample folder of n real images (Fashion-MNIST training images standing in for samples)
    against the 400 test images (their features cached by a first, unrecorded eval), metrics FID and KID, batch 50
    (the quickstart's). Also the FID formula alone (its 2048 x 2048 matrix square root: a fixed cost per model).

Each series gets a least-squares line (seconds = fixed + per_unit x units) and the largest deviation of a point
from it, so the table can say where a cost grows linearly and where it does not.

    python benchmarks/cost_growth.py [--only search|eval] [--save benchmarks/results/cpu-cost_growth.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "assets" / "fmnist-ddpm"
TRAIN = ROOT / "assets" / "fashion-mnist" / "train"
TEST = ROOT / "assets" / "fashion-mnist" / "test"
N = 4
SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0, 3.25, 3.5, 3.75, 4.0]

sys.path.insert(0, str(Path(__file__).resolve().parent))


def line(points: list[tuple[float, float]]) -> dict:
    """Least-squares seconds = fixed + per_unit * units, and the largest |point - line| relative to the point."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    fixed = my - slope * mx
    dev = max(abs(y - (fixed + slope * x)) / y for x, y in points)
    return {"fixed_seconds": round(fixed, 2), "seconds_per_unit": round(slope, 4), "max_relative_deviation": round(dev, 3)}


def _copy_images(files: list, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(files):
        shutil.copy(f, dest / f"{k:06d}.png")
    return dest


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def search_series(work: Path, candidates: list[int], images: list[int], base_c: int, base_m: int) -> dict:
    """Seconds of `deme merge --search` (run_merge) against candidates C and images per candidate M."""
    from deme_cli.commands.merge import run_merge
    from deme_cli.engine.features import image_files
    from deme_cli.engine.models import load_unet
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.runs import RunDir
    from merge_memory import write_range_models

    root = work / "search-run"
    write_range_models(load_unet(BASE), root, N, scale=1e-2, base_folder=BASE)
    held = _copy_images(image_files(TRAIN)[-64:], work / "held-out")

    def search(c: int, m: int) -> dict:
        recipe = recipe_from_dict({
            "name": "bench", "model": {"pretrained": str(BASE)}, "data": {"path": str(TRAIN), "resolution": 16},
            "ranges": {"n": N}, "sample": {"scheduler": "ddim", "steps": 10, "batch_size": 64},
            "merge": {"weights": "search", "search": "scaled", "shapes": [[1.0 / N] * N], "scales": SCALES[:c - 1],
                      "objective": "kid", "search_num_images": m, "search_steps": 10,
                      "search_reference": str(held)},
            "eval": {"batch_size": 64}, "output": {"dir": str(root)}})
        load, t0 = _load(), time.perf_counter()
        rec = run_merge(recipe, RunDir(root), search=True, force=True)
        total = time.perf_counter() - t0
        log = rec["search"]
        assert log["evaluations"] == c, (log["evaluations"], c)
        return {"candidates": c, "images_per_candidate": m, "merge_seconds": round(total, 2),
                "search_seconds": log["seconds"], "load_average_1min": load}

    search(2, 8)                        # caches the held-out images' features; not recorded
    by_c = [search(c, base_m) for c in candidates]
    by_m = [search(base_c, m) for m in images]
    return {"setup": f"N = {N} range models of assets/fmnist-ddpm (1.06M params, 16 px), objective kid, DDIM-10, "
                     f"64 held-out images (features cached)",
            "by_candidates": by_c, "by_images_per_candidate": by_m,
            "line_by_candidates": line([(r["candidates"], r["search_seconds"]) for r in by_c]),
            "line_by_images_per_candidate": line([(r["images_per_candidate"], r["search_seconds"]) for r in by_m])}


def eval_series(work: Path, counts: list[int]) -> dict:
    """Seconds of `deme eval` (FID and KID) against the number of sample images."""
    import numpy as np

    from deme_cli.commands.eval import run_eval
    from deme_cli.engine.features import image_files
    from deme_cli.engine.fid import frechet_distance
    from deme_cli.engine.recipe import recipe_from_dict
    from deme_cli.engine.runs import RunDir

    train = image_files(TRAIN)

    def evaluate(n: int) -> float:
        recipe = recipe_from_dict({
            "name": "bench", "model": {"pretrained": str(BASE)}, "data": {"path": str(TRAIN), "resolution": 16},
            "ranges": {"n": N}, "sample": {"num_images": n},
            "eval": {"reference": str(TEST), "metrics": ["fid", "kid"], "batch_size": 50},
            "output": {"dir": str(work / "eval-run")}})
        run = RunDir(recipe.out_dir)
        folder = run.samples("base")
        shutil.rmtree(folder, ignore_errors=True)
        _copy_images(train[:n], folder)
        (folder / "samples.json").write_text(json.dumps({"seeds": {"base": 0, "count": n}, "scheduler": "ddim"}))
        t0 = time.perf_counter()
        run_eval(recipe, run, ["base"], force=True)
        return time.perf_counter() - t0

    first = evaluate(counts[0])         # computes and caches the 400 reference images' features
    rows = []
    for n in counts:
        load = _load()
        rows.append({"images": n, "seconds": round(evaluate(n), 2), "load_average_1min": load})
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((500, 2048)), rng.standard_normal((500, 2048))
    t0 = time.perf_counter()
    frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    fid_formula = time.perf_counter() - t0
    return {"setup": "deme eval, metrics fid + kid, batch 50, reference: 400 test images (features cached)",
            "first_eval_seconds_with_reference_features": round(first, 2), "rows": rows,
            "fid_formula_seconds": round(fid_formula, 2),
            "line": line([(r["images"], r["seconds"]) for r in rows])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["search", "eval"])
    ap.add_argument("--candidates", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--images", type=int, nargs="+", default=[8, 16, 32], help="images per search candidate")
    ap.add_argument("--base-candidates", type=int, default=4)
    ap.add_argument("--base-images", type=int, default=16)
    ap.add_argument("--eval-images", type=int, nargs="+", default=[50, 100, 200, 400])
    ap.add_argument("--save", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="deme-cost-growth-") as tmp:
        if args.only in (None, "search"):
            report["search"] = search_series(Path(tmp), args.candidates, args.images, args.base_candidates,
                                             args.base_images)
            print(json.dumps(report["search"], indent=1), flush=True)
        if args.only in (None, "eval"):
            report["eval"] = eval_series(Path(tmp), args.eval_images)
            print(json.dumps(report["eval"], indent=1), flush=True)
    report["load_average_after"] = os.getloadavg()
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        args.save.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
