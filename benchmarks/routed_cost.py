"""Cost of the routed ensemble as one model (`deme merge --method routed`) against the base model, side by side.

    python benchmarks/routed_cost.py                   # the Fashion-MNIST UNet of assets/fmnist-ddpm (see --configs)
    python benchmarks/routed_cost.py --configs 4:full:on --quick     # a smoke run

For each configuration N:kind:projection (full: N range models, each the base UNet perturbed; lora: N rank --rank
adapters on the default targets (adapters.DEFAULT_TARGETS), random; projection on or off: deme.projection) the script
writes the N range folders as `deme train` does (models.save_model_folder, adapters.save_lora_folder), a uniform
ranges.json, and merged/ with `deme merge --method routed` (commands.merge.run_merge), then measures the routed model
loaded from merged/ (the DemeUNet of unet/deme_unet.py) against the base UNet and against one range model loaded as
`deme sample --model range:0` loads it (the architecture of a merged model: the base plus the same projections):
  images/s   deme's sampling loop (denoise.generate: DDIM --steps, --images images in batches of --batch, fp32, one
             thread), the three models alternating for --rounds rounds (the order reversed every round); the median
             round of each, per second of the process's CPU time (on a shared CPU the steadiest) and of wall time.
             speed_ratio = routed / base (the issue's goal); routing_ratio = routed / one range model (what routing
             itself costs, the projections being in both)
  tensors    bytes of the tensors the model holds after sampling: parameters, buffers and, for LoRA, the base entries
             kept aside while a range model is switched in (deme_unet.DemeUNet.activate)
  peak RSS   each model alone in a fresh process: the process's peak RSS after loading it and sampling one batch, minus
             its peak after the imports
  disk       merged/'s bytes: apparent (what a copy or an upload moves) and its own (files that are not hard links to
             the base's or the range folders' files)
Goals (issue 25): images/s of the routed model >= 0.95x the base's, full and LoRA; LoRA memory <= 1.1x (the base
plus the N adapters). Nothing is trained: the weights are random perturbations, which cost what trained ones cost.

JSON: benchmarks/results/cpu-routed_cost-fmnist.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from child_process import in_child  # noqa: E402  (benchmarks/: one measurement in a fresh process)

FMNIST = ROOT / "assets" / "fmnist-ddpm"
KINDS = ("full", "lora")


def recipe_for(root: Path, n: int, kind: str, projection: bool, rank: int):
    from deme_cli.engine.recipe import recipe_from_dict

    deme = {"projection": projection, **({"adapter": "lora", "lora_rank": rank} if kind == "lora" else {})}
    name = f"routed-{kind}-{n}-{'proj' if projection else 'noproj'}"
    return recipe_from_dict({"name": name, "seed": 0, "model": {"pretrained": str(FMNIST)},
                             "data": {"path": str(ROOT / "assets" / "fashion-mnist"), "resolution": 16},
                             "ranges": {"n": n}, "deme": deme, "merge": {"method": "routed"},
                             "output": {"dir": str(root / name)}})


def write_range_models(recipe, scale: float = 0.02) -> None:
    """N range folders as `deme train` writes them, holding random perturbations of the base (full) or random
    adapters (lora), each with perturbed projections; and ranges.json."""
    import torch

    from deme_cli.commands.split import run_split
    from deme_cli.engine import adapters, models
    from deme_cli.engine.runs import RunDir

    run = RunDir(recipe.out_dir)
    ranges = run_split(recipe, run)["ranges"]
    base_hash = models.unet_hash(models.load_unet(FMNIST))
    for r in ranges:
        gen = torch.Generator().manual_seed(r["index"])
        model = models.wrap(models.load_unet(FMNIST), projection=recipe.deme.projection)
        meta = {"range": r, "base_hash": base_hash, "recipe": recipe.name, "weights": "ema", "steps": 0}
        if recipe.deme.adapter == "lora":
            config = adapters.add_lora(model.unet, recipe.deme, seed=r["index"])
            trained = {n: p for n, p in model.named_parameters() if p.requires_grad or n.startswith("projections.")}
            with torch.no_grad():
                for p in trained.values():
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
            meta.update(adapter=adapters.meta(config), base_model=str(FMNIST))
            adapters.save_lora_folder(run.final(r["index"]), model, meta,
                                      {n: p.detach() for n, p in trained.items()}, FMNIST)
        else:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
            models.save_model_folder(run.final(r["index"]), model, meta, base_folder=FMNIST)


def tensor_bytes(model) -> int:
    """Bytes of every tensor the model holds (each storage once), LoRA's kept-aside base entries included."""
    seen, total = set(), 0
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers()]
    tensors += [t for pair in getattr(model, "_saved", {}).values() for t in pair]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def folder_bytes(folder: Path) -> dict:
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return {"apparent": sum(p.stat().st_size for p in files),
            "own": sum(p.stat().st_size for p in files if p.stat().st_nlink == 1)}


def load(which: str, merged: Path):
    """base: the stock UNet; routed: merged/'s DemeUNet; one: range model 0 as `deme sample --model range:0` does."""
    from deme_cli.engine.adapters import load_model
    from deme_cli.engine.deme_unet import DemeUNet
    from deme_cli.engine.models import load_unet

    if which == "one":
        return load_model(merged.parent / "ranges" / "0" / "final", FMNIST).eval()
    return (load_unet(FMNIST) if which == "base" else DemeUNet.from_pretrained(merged / "unet")).eval()


def sample(model, images: int, batch: int, steps: int):
    import torch

    from deme_cli.engine.denoise import UNetDenoiser, generate
    from deme_cli.engine.models import scheduler_config

    return generate(UNetDenoiser(model), "ddim", steps, list(range(images)), scheduler_config=scheduler_config(FMNIST),
                    batch_size=batch, precision="fp32", device=torch.device("cpu"))


def _status(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_rss(which: str, merged: str, batch: int, steps: int, threads: int) -> dict:
    """In a fresh process, after the imports: the peak RSS while loading the model and sampling one batch, above the
    RSS before (Linux: the peak is reset by writing 5 to /proc/self/clear_refs, so the imports' own peak is not
    counted)."""
    import torch

    import deme_cli.engine.deme_unet  # noqa: F401  (the imports are in the baseline)
    import deme_cli.engine.denoise  # noqa: F401

    torch.set_num_threads(threads)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    model = load(which, Path(merged))
    sample(model, batch, batch, steps)
    return {"peak_rss_bytes": _status("VmHWM") - before, "baseline_rss_bytes": before, "model": type(model).__name__}


def measure(n: int, kind: str, projection: bool, root: Path, a) -> dict:
    import torch

    from deme_cli.commands.merge import run_merge
    from deme_cli.engine import adapters
    from deme_cli.engine.runs import RunDir

    recipe = recipe_for(root, n, kind, projection, a.rank)
    write_range_models(recipe)
    run = RunDir(recipe.out_dir)
    run_merge(recipe, run)
    models = {w: load(w, run.merged) for w in ("base", "one", "routed")}
    for m in models.values():                                   # warm-up: one batch each
        sample(m, a.batch, a.batch, a.steps)
    rounds = {w: [] for w in models}
    cpu_rounds = {w: [] for w in models}
    order = list(models)
    for _ in range(a.rounds):
        for w in order:
            t0, c0 = time.perf_counter(), time.process_time()
            sample(models[w], a.images, a.batch, a.steps)
            rounds[w].append(a.images / (time.perf_counter() - t0))
            cpu_rounds[w].append(a.images / (time.process_time() - c0))
        order.reverse()
    models.pop("one")
    ips = {w: statistics.median(v) for w, v in rounds.items()}
    cpu_ips = {w: statistics.median(v) for w, v in cpu_rounds.items()}
    held = {w: tensor_bytes(m) for w, m in models.items()}
    trained = 0                                                 # one range model's trained tensors (adapter + proj.)
    if kind == "lora":
        _, tensors = adapters.read_adapter(run.final(0))
        proj = adapters.read_projections(run.final(0), models["base"])
        trained = sum(t.numel() * t.element_size() for t in tensors.values()) + \
            (sum(p.numel() * p.element_size() for p in proj.parameters()) if proj is not None else 0)
    rss = {w: in_child(peak_rss, w, str(run.merged), a.batch, a.steps, torch.get_num_threads()) for w in models}
    disk = folder_bytes(run.merged)
    base_disk = folder_bytes(FMNIST / "unet")["apparent"]
    row = {"n": n, "kind": kind, "projection": projection, "img_per_s": ips, "rounds_img_per_s": rounds,
           "img_per_cpu_s": cpu_ips, "rounds_img_per_cpu_s": cpu_rounds,
           "speed_ratio": cpu_ips["routed"] / cpu_ips["base"], "routing_ratio": cpu_ips["routed"] / cpu_ips["one"],
           "wall_speed_ratio": ips["routed"] / ips["base"], "tensor_bytes": held, "peak_rss": rss,
           "disk_bytes": {"merged": disk, "base_unet": base_disk}, "trained_bytes_per_range": trained,
           "calls_per_range": list(models["routed"].calls)}
    row["memory_ratio"] = held["routed"] / (held["base"] + n * trained) if kind == "lora" else \
        held["routed"] / held["base"]
    row["memory_reference"] = "base + N adapters (and their projections)" if kind == "lora" else "base"
    return row


def table(rows: list[dict]) -> list[str]:
    mb = lambda x: f"{x / 1e6:.2f}" if x is not None else "-"  # noqa: E731
    out = ["| N | kind | projections | img/CPU-s base / one range model / routed | routed / base | routed / one | "
           "tensors MB base / routed | memory ratio | peak RSS MB base / routed | merged/ disk MB apparent / own |",
           "|---:|---|---|---|---:|---:|---|---:|---|---|"]
    for r in rows:
        rss = [r["peak_rss"][w].get("peak_rss_bytes") for w in ("base", "routed")]
        ips = r["img_per_cpu_s"]
        out.append(f"| {r['n']} | {r['kind']} | {'on' if r['projection'] else 'off'} | {ips['base']:.2f} / "
                   f"{ips['one']:.2f} / {ips['routed']:.2f} | {r['speed_ratio']:.3f} | {r['routing_ratio']:.3f} | "
                   f"{mb(r['tensor_bytes']['base'])} / {mb(r['tensor_bytes']['routed'])} | "
                   f"{r['memory_ratio']:.3f} ({r['memory_reference']}) | {mb(rss[0])} / {mb(rss[1])} | "
                   f"{mb(r['disk_bytes']['merged']['apparent'])} / {mb(r['disk_bytes']['merged']['own'])} |")
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="4:full:on,4:lora:on,4:full:off,4:lora:off,2:full:on,2:lora:on,8:full:on,"
                                         "8:lora:on", help="N:kind:projection, comma-separated (N = 4, the paper's, "
                                                          "first)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (deme.lora_rank's default)")
    ap.add_argument("--images", type=int, default=64, help="images per timed round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (the release samples DDIM-50)")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds of each model")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared CPU)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 images, batch 16, 10 steps, 2 rounds")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "cpu-routed_cost-fmnist.json")
    a = ap.parse_args()
    if a.quick:
        a.images, a.batch, a.steps, a.rounds = 32, 16, 10, 2
    torch.set_num_threads(a.threads)
    import diffusers

    out = {"benchmark": "routed_cost", "command": "python benchmarks/routed_cost.py " + shlex.join(sys.argv[1:]),
           "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": "cpu", "device_type": "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
           "unet": str(FMNIST.relative_to(ROOT)), "images": a.images, "batch": a.batch, "steps": a.steps,
           "rounds": a.rounds, "rank": a.rank, "quick": a.quick, "rows": [],
           "goals": {"speed_ratio_min": 0.95, "lora_memory_ratio_max": 1.1}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="routed-cost-") as tmp:
        for config in a.configs.split(","):
            n, kind, proj = config.split(":")
            if kind not in KINDS or proj not in ("on", "off"):
                raise SystemExit(f"--configs: '{config}' is not N:full|lora:on|off")
            t0 = time.perf_counter()
            out["rows"].append(measure(int(n), kind, proj == "on", Path(tmp), a))
            print(f"# {config}: {time.perf_counter() - t0:.0f} s", flush=True)
            print("\n".join(table(out["rows"][-1:])[2:]), flush=True)
            a.out.write_text(json.dumps(out, indent=2) + "\n")       # after every row: a stopped run keeps them
    print("\n".join(table(out["rows"])))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
