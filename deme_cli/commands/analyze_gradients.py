"""`deme analyze-gradients`: cosine similarity of denoising-loss gradients across timesteps (the paper's Fig. 1a).

The sketches, the matrix file and the pictures are the engine's (engine/gradients.py, whose docstring says what is
computed); this stage picks the timesteps and the parameters, loads the base, and reuses a finished analysis with the
same settings.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np

from ..engine import preflight, ui
from ..engine.base import Base, resolve_base
from ..engine.errors import UsageError
from ..engine.gradients import (DEFAULT_BINS, EXACT_LIMIT, HEATMAP_FILE, HISTOGRAM_FILE, JSON_FILE, NPZ_FILE,
                                REDUCERS, bin_grid, cosine_matrix, denoising_gradient, explicit_grid, fixed_batch,
                                load_matrix, parse_timesteps, plot_all, save_matrix, select_parameters, summarize)
from ..engine.recipe import DataSection, stage_kwargs
from ..engine.runs import RunDir, write_json


def run_analyze_gradients(recipe, run: RunDir, **options) -> dict:
    """`deme analyze-gradients RECIPE` (options: those of `analyze_gradients`)."""
    return analyze_gradients(resolve_base(recipe.model, recipe.train.device), run, **options,
                             **stage_kwargs(analyze_gradients, recipe))


def analyze_gradients(base: Base, run: RunDir, *, data: DataSection, seed: int, bins: Optional[int] = None,
                      timesteps: Optional[str] = None, params: Optional[str] = None, method: str = "countsketch",
                      sketch_dim: int = 4096, batch_size: int = 16, force: bool = False) -> dict:
    """Compute (or reuse) the B x B gradient cosine-similarity matrix and its pictures; returns the summary.

    bins        number of equal timestep bins B over [0, T), one timestep at each centre (default DEFAULT_BINS)
    timesteps   explicit comma-separated timesteps instead of bins ("10,100,500")
    params      parameter-name pattern(s) (see select_parameters); None: all parameters
    method      countsketch | gaussian | exact (see REDUCERS)
    sketch_dim  k, the sketch's dimension (ignored by exact)
    batch_size  images in the fixed batch (and noise draws), each timestep's loss averages over them
    force       recompute even if gradients.npz already holds this analysis
    """
    import torch

    from ..engine.models import unet_hash

    # Check the request.
    if method not in REDUCERS:
        raise UsageError(f"unknown --method '{method}' (known: {', '.join(REDUCERS)})")
    if method != "exact" and sketch_dim < 1:
        raise UsageError(f"--sketch-dim must be at least 1, got {sketch_dim}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if bins is not None and timesteps is not None:
        raise UsageError("give either --bins or --timesteps, not both")
    scheduler, T = base.noise_scheduler(), base.T
    if timesteps is not None:
        ts, edges = explicit_grid(T, parse_timesteps(timesteps))
    else:
        ts, edges = bin_grid(T, DEFAULT_BINS if bins is None else bins)

    preflight.check_data(data, base.kind.conditional)      # before the model is loaded

    # Load the pretrained model and choose its parameters.
    device = base.device
    unet = base.load_unet().to(device).eval()
    unet.requires_grad_(True)
    chosen = select_parameters(unet, params)
    numel = sum(p.numel() for _, p in chosen)
    if method == "exact" and len(ts) * numel * 4 > EXACT_LIMIT:
        raise UsageError(f"--method exact would keep {len(ts) * numel * 4 / 2**30:.1f} GiB of gradients; use "
                         f"--method countsketch")
    x0, cond, image_idx = fixed_batch(base, data, seed, unet, device, batch_size)
    settings = {"model": base.pretrained, "model_hash": unet_hash(unet), "T": T, "seed": seed,
                "batch_size": int(x0.shape[0]), "images": [int(i) for i in image_idx], "data": data.path or data.name,
                "resolution": data.resolution, "params": params or "*",
                "num_tensors": len(chosen), "num_params": int(numel), "method": method,
                "sketch_dim": None if method == "exact" else int(sketch_dim),
                "prediction_type": scheduler.config.prediction_type, "timesteps": ts.tolist(),
                "edges": edges.tolist(), "loss": "mean squared error over batch, channels and pixels",
                "conditioning": sorted(cond),
                "model_mode": "eval (dropout off), fp32"}

    # Reuse a finished analysis with the same settings; refuse to replace a different one without --force.
    out = run.analysis
    if (out / NPZ_FILE).is_file() and not force:
        old = load_matrix(out / NPZ_FILE)
        if old["settings"] == settings:
            ui.info(f"{out / NPZ_FILE} already holds this analysis; --force recomputes it")
            summary = summarize(old["matrix"], old["timesteps"], T)
            plot_all(out, old["matrix"], old["timesteps"], old["edges"], T, settings, summary)
            return _result(out, summary, settings, reused=True)
        differ = [k for k in settings if old["settings"].get(k) != settings[k]]
        raise UsageError(f"'{out / NPZ_FILE}' holds an analysis with other settings ({', '.join(differ)}); pass "
                         f"--force to replace it, or use another --out")

    # Fixed noise, shared by every timestep.
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    x0 = x0.to(device, torch.float32)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)

    # One gradient per timestep, reduced at once.
    reduce, rows, losses, norms = REDUCERS[method], [], [], []
    with ui.progress("gradients", total=len(ts), unit="timestep", every=1) as bar:
        for t in ts:
            grads, loss = denoising_gradient(unet, chosen, scheduler, x0, noise, int(t), cond)
            with torch.no_grad():
                rows.append(reduce(grads, sketch_dim, seed).numpy())
                norms.append(math.sqrt(sum(float(g.double().pow(2).sum()) for _, g in grads)))
            losses.append(loss)
            del grads
            bar.update(1, t=int(t), loss=loss)
    matrix = cosine_matrix(np.stack(rows))
    del rows

    # Write the matrix, the summary and the pictures.
    summary = summarize(matrix, ts, T)
    save_matrix(out / NPZ_FILE, matrix, ts, edges, T, settings, loss=np.array(losses), grad_norm=np.array(norms))
    write_json(out / JSON_FILE, {"summary": summary, "settings": settings, "loss": losses, "grad_norm": norms})
    plot_all(out, matrix, ts, edges, T, settings, summary)
    return _result(out, summary, settings, reused=False)


def _result(out: Path, summary: dict, settings: dict, reused: bool) -> dict:
    return {"analysis": str(out), "reused": reused, "summary": summary,
            "files": {k: str(out / f) for k, f in (("matrix", NPZ_FILE), ("summary", JSON_FILE),
                                                   ("heatmap", HEATMAP_FILE), ("histogram", HISTOGRAM_FILE))},
            "settings": {k: v for k, v in settings.items() if k not in ("images", "edges")}}
