"""Gradient similarity across timesteps: the paper's Fig. 1a, the "task affinity" of Go et al. (ANT, NeurIPS 2023).

For a fixed batch of real images x0 and a fixed noise eps, both shared by every timestep and seeded with the recipe's
seed, and for each timestep t of a grid of B timesteps:

    x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    g_t = d/d(theta) mean_batch,pixels (target_t - model_theta(x_t, t))^2     (target: eps for eps-prediction)

theta is the pretrained UNet's parameters (all, or those whose names match `--params`); the model is in eval mode
(dropout off). The batch is prepared as training prepares it (the model kind's task, kinds.py): for Stable Diffusion,
x0 is the VAE latents and the UNet is conditioned on the captions' text embeddings (captions never dropped). The B x B
matrix S[i, j] = cos(g_i, g_j) is symmetric, has a unit diagonal and lies in [-1, 1].

Memory stays bounded: each gradient is reduced to a vector as soon as it is computed (REDUCERS), so at most one full
gradient exists at a time:
  countsketch (default)  a sparse random projection to k dims: coordinate j of the gradient is added, times a random
                         sign s_j, to bucket h_j of k. Inner products are unbiased, and the cosine error is about
                         (1 - cos^2) / sqrt(k). Cost O(#params) per timestep whatever k is.
  gaussian               a dense Gaussian projection to k dims, R with N(0, 1/k) entries. Cost O(#params * k).
  exact                  the full gradient, kept on the CPU (B x #params x 4 bytes): for small models and tests.
Both sketches draw the projection of each parameter, in chunks, from a generator seeded with (seed, parameter name,
chunk), so the same projection is regenerated for every timestep and never materialised whole.

Outputs under <run>/analysis/: gradients.npz (matrix, timesteps, bin edges, per-timestep loss and gradient norm,
settings as JSON), gradients.json (summary and settings), gradients.png (heat map), gradients-hist.png (histogram of
pairwise similarities: all pairs against pairs inside the first quarter of [0, T), as in Fig. 1a).
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from . import ui
from .errors import UsageError

DEFAULT_BINS = 20           # timestep bins of the matrix when neither bins nor timesteps are given
NPZ_FILE = "gradients.npz"
JSON_FILE = "gradients.json"
HEATMAP_FILE = "gradients.png"
HISTOGRAM_FILE = "gradients-hist.png"
CHUNK = 1 << 22              # gradient elements per projection chunk (bounds the sketch's temporary memory)
EXACT_LIMIT = 4 << 30        # bytes of gradients the exact reducer may keep (B x #params x 4)

# --- the timestep grid ---------------------------------------------------------------------------------------------

def bin_grid(T: int, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """B equal bins over [0, T): edges (i T) // B, one timestep per bin at its centre (lo + hi - 1) // 2."""
    if bins < 2 or bins > T:
        raise UsageError(f"--bins must be between 2 and T = {T} (the model's num_train_timesteps), got {bins}")
    edges = (np.arange(bins + 1) * T) // bins
    return (edges[:-1] + edges[1:] - 1) // 2, edges

def parse_timesteps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--timesteps expects comma-separated integers like 10,100,500, got '{text}'") from None

def explicit_grid(T: int, timesteps: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Given timesteps (sorted); bin i owns [edges[i], edges[i+1]) with edges halfway between neighbours, 0 and T."""
    ts = sorted(set(timesteps))
    if len(ts) < 2:
        raise UsageError("--timesteps needs at least 2 distinct timesteps")
    if ts[0] < 0 or ts[-1] >= T:
        raise UsageError(f"--timesteps must lie in [0, {T}) (the model's num_train_timesteps), got {ts[0]}..{ts[-1]}")
    t = np.array(ts, dtype=np.int64)
    return t, np.concatenate([[0], (t[:-1] + t[1:] + 1) // 2, [T]]).astype(np.int64)

# --- parameters ----------------------------------------------------------------------------------------------------

def select_parameters(module, patterns: Optional[str]) -> list[tuple[str, Any]]:
    """(name, parameter) pairs selected by `patterns`: comma-separated globs on the full name (`up_blocks.*`), or
    regular expressions with a `re:` prefix (`re:attentions\\.\\d+\\.to_q`, searched anywhere). None: all."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not patterns:
        return named
    pats = [p.strip() for p in patterns.split(",") if p.strip()]

    def matches(name: str, pat: str) -> bool:
        if pat.startswith("re:"):
            try:
                return re.search(pat[3:], name) is not None
            except re.error as e:
                raise UsageError(f"--params pattern '{pat}' is not a valid regular expression ({e})") from None
        return fnmatch.fnmatchcase(name, pat)

    chosen = [(n, p) for n, p in named if any(matches(n, pat) for pat in pats)]
    if not chosen:
        sample = ", ".join(n for n, _ in named[:3])
        raise UsageError(f"--params '{patterns}' matches no parameter of the model (names look like {sample}); "
                         f"use a glob such as 'up_blocks.*' or a regex such as 're:attentions'")
    return chosen

# --- reducers: full gradient -> the vector whose cosines we take ----------------------------------------------------

def _chunks(name: str, grad, seed: int):
    """(flat chunk, torch.Generator) pairs; the generator is seeded with (seed, name, chunk index)."""
    import torch

    flat = grad.reshape(-1)
    for c, start in enumerate(range(0, flat.numel(), CHUNK)):
        s = int(np.random.SeedSequence([seed, zlib.crc32(name.encode()), c]).generate_state(1)[0])
        yield flat[start:start + CHUNK], torch.Generator(device=flat.device).manual_seed(s)

def countsketch(grads: list[tuple[str, Any]], k: int, seed: int):
    """Sparse random projection to k dims: sum_j s_j g_j e_{h_j}, s_j = +-1, h_j uniform in [0, k)."""
    import torch

    dev = grads[0][1].device
    out = torch.zeros(k, dtype=torch.float64, device=dev)
    for name, g in grads:
        for part, gen in _chunks(name, g, seed):
            r = torch.randint(0, 2 * k, (part.numel(),), generator=gen, device=dev)
            signed = torch.where(r < k, part, -part).double()
            out.index_add_(0, r % k, signed)
    return out.cpu()

def gaussian_sketch(grads: list[tuple[str, Any]], k: int, seed: int):
    """Dense Gaussian projection to k dims, R^T g with R_jl ~ N(0, 1), generated in row blocks (the 1/sqrt(k)
    scale is left out: it does not change cosines)."""
    import torch

    dev = grads[0][1].device
    out = torch.zeros(k, dtype=torch.float64, device=dev)
    rows = max(1, CHUNK // k)
    for name, g in grads:
        for part, gen in _chunks(name, g, seed):
            for start in range(0, part.numel(), rows):
                piece = part[start:start + rows].float()
                out += (piece @ torch.randn(piece.numel(), k, generator=gen, device=dev)).double()
    return out.cpu()

def exact(grads: list[tuple[str, Any]], k: int, seed: int):
    """The full gradient, flattened, on the CPU."""
    import torch

    return torch.cat([g.reshape(-1).float().cpu() for _, g in grads])

REDUCERS: dict[str, Callable] = {"countsketch": countsketch, "gaussian": gaussian_sketch, "exact": exact}

def cosine_matrix(vectors) -> np.ndarray:
    """B x B cosine similarities of the rows of `vectors` (B x d): symmetric, unit diagonal, clipped to [-1, 1]."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1)
    if np.any(norms == 0):
        raise UsageError("the selected parameters get no gradient from the denoising loss at some timestep; choose "
                         "other parameters with --params")
    u = v / norms[:, None]
    s = u @ u.T
    s = (s + s.T) / 2
    np.fill_diagonal(s, 1.0)
    return np.clip(s, -1.0, 1.0)

# --- the denoising loss ----------------------------------------------------------------------------------------------

def denoising_gradient(unet, params: list[tuple[str, Any]], scheduler, x0, noise, t: int,
                       cond: Optional[dict] = None):
    """(gradients as (name, tensor) pairs, loss): the mean-MSE denoising loss of the batch at timestep t.

    `cond`: extra UNet inputs (text embeddings for Stable Diffusion). The target follows the scheduler's
    prediction_type, as in training (loss.TARGETS).
    """
    import torch
    import torch.nn.functional as F

    from .loss import TARGETS

    kind = scheduler.config.prediction_type
    if kind not in TARGETS:
        raise UsageError(f"the scheduler's prediction_type '{kind}' is not supported (known: {', '.join(TARGETS)})")
    tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
    x_t = scheduler.add_noise(x0, noise, tt)
    pred = unet(x_t, tt, **(cond or {})).sample[:, :x0.shape[1]]   # learned-variance models predict 2C channels
    target = TARGETS[kind](scheduler, x0, noise, tt)
    loss = F.mse_loss(pred.float(), target.float())
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return [(n, g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params, grads)], \
        float(loss.detach())

def fixed_batch(base, data, seed: int, unet, device, n: int):
    """n training items of `[data]` chosen by a permutation seeded with `seed`, prepared as training prepares them.

    Returns (x0, cond, indices): x0 the images in [-1, 1] (pixel models) or their VAE latents (Stable Diffusion),
    cond the extra UNet inputs (the captions' text embeddings; captions are never dropped here).
    """
    from torch.utils.data import default_collate

    data = data.model_copy(update={"cache_latents": False, "caption_dropout": 0.0})  # a few items: no cache
    task = base.kind.task(base, unet, data, seed=seed, device=device)
    ds = task.dataset()
    if len(ds) < n:
        ui.warn(f"the data holds {len(ds)} images, fewer than --batch-size {n}: using all of them")
        n = len(ds)
    idx = np.sort(np.random.default_rng([seed, 0x6AD]).permutation(len(ds))[:n])
    x0, cond = task.prepare(default_collate([ds[int(i)] for i in idx]))
    return x0, cond, idx

def _pairs(matrix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    iu = np.triu_indices(len(matrix), 1)
    return matrix[iu][mask[iu]]

def summarize(matrix: np.ndarray, timesteps: np.ndarray, T: int) -> dict:
    """Mean similarity of adjacent bins, of pairs more than T/2 apart, of pairs inside [0, T/4), of all pairs."""
    t = np.asarray(timesteps)
    gap = np.abs(t[:, None] - t[None, :])
    early = (t[:, None] < T / 4) & (t[None, :] < T / 4)

    def mean(x):
        return round(float(np.mean(x)), 4) if len(x) else None

    far, first = _pairs(matrix, gap > T / 2), _pairs(matrix, early)
    return {"bins": int(len(t)), "adjacent_mean": mean(np.diag(matrix, 1)),
            "distant_mean": mean(far), "distant_pairs": int(len(far)),
            "first_quarter_mean": mean(first), "first_quarter_pairs": int(len(first)),
            "all_pairs_mean": mean(_pairs(matrix, gap >= 0)), "min": round(float(matrix.min()), 4)}

# --- files -----------------------------------------------------------------------------------------------------------

def _replace(path: Path, write: Callable[[str], None], suffix: str) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def save_matrix(path: Path, matrix: np.ndarray, timesteps, edges, T: int, settings: dict, **extra) -> None:
    """gradients.npz: matrix (B x B), timesteps (B), edges (B + 1), T, settings (JSON string), extra arrays."""
    arrays = {"matrix": np.asarray(matrix, np.float64), "timesteps": np.asarray(timesteps, np.int64),
              "edges": np.asarray(edges, np.int64), "T": np.int64(T), "settings": np.array(json.dumps(settings)),
              **{k: np.asarray(v) for k, v in extra.items()}}
    _replace(Path(path), lambda tmp: np.savez(tmp, **arrays), ".npz")

def load_matrix(path: Path) -> dict:
    """Read a gradients.npz back (never unpickles), checking that its parts fit together."""
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        m, t, e = d["matrix"], d["timesteps"], d["edges"]
        T = int(d["T"])
        settings = json.loads(str(d["settings"])) if "settings" in d else {}
        ok = (m.ndim == 2 and m.shape[0] == m.shape[1] == len(t) == len(e) - 1 and e[0] == 0 and e[-1] == T
              and np.all(np.diff(e) > 0))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UsageError(f"'{path}' is not a gradient matrix written by `deme analyze-gradients`; run it again "
                         f"(with --force)")
    return {"matrix": m, "timesteps": t, "edges": e, "T": T, "settings": settings}

# --- pictures --------------------------------------------------------------------------------------------------------

def _subtitle(settings: dict) -> str:
    how = "exact" if settings["method"] == "exact" else f"{settings['method']} k={settings['sketch_dim']}"
    return (f"model {settings['model_hash'][:8]}, params {settings['params']} ({settings['num_params']:,}), "
            f"batch {settings['batch_size']}, seed {settings['seed']}, {how}")

def plot_all(out: Path, matrix, timesteps, edges, T: int, settings: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    plot_heatmap(out / HEATMAP_FILE, matrix, timesteps, edges, T, settings, summary)
    plot_histogram(out / HISTOGRAM_FILE, matrix, timesteps, T, settings)

def plot_heatmap(path: Path, matrix, timesteps, edges, T: int, settings: dict, summary: dict) -> None:
    """B x B cells drawn over their timestep bins, t = 0 at the top left; diverging colours, -1 blue, +1 red."""
    import matplotlib.pyplot as plt

    B = len(matrix)
    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=120, layout="constrained")
    mesh = ax.pcolormesh(edges, edges, matrix, cmap="RdBu_r", vmin=-1, vmax=1, shading="flat")
    if B <= 12:   # few cells: print their values
        for i in range(B):
            for j in range(B):
                cx, cy = (edges[j] + edges[j + 1]) / 2, (edges[i] + edges[i + 1]) / 2
                ax.text(cx, cy, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(matrix[i, j]) > 0.6 else "black")
    ax.set_xlim(0, T)
    ax.set_ylim(T, 0)
    ax.set_aspect("equal")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("timestep t")
    ax.xaxis.set_ticks_position("bottom")
    fig.colorbar(mesh, ax=ax, shrink=0.85, label="cosine similarity of loss gradients")
    far = summary["distant_mean"]
    fig.suptitle(f"Gradient similarity across timesteps ({B} bins)\nmean: adjacent bins "
                 f"{summary['adjacent_mean']:.2f}, bins more than T/2 apart {'-' if far is None else f'{far:.2f}'}",
                 fontsize=10)
    ax.set_title(_subtitle(settings), fontsize=7, color="0.35")
    _replace(Path(path), lambda tmp: fig.savefig(tmp, format="png"), ".png")
    plt.close(fig)

def plot_histogram(path: Path, matrix, timesteps, T: int, settings: dict) -> None:
    """Density of pairwise similarities (i < j): all pairs vs pairs whose timesteps both lie in [0, T/4)."""
    import matplotlib.pyplot as plt

    t = np.asarray(timesteps)
    every = _pairs(matrix, np.ones_like(matrix, dtype=bool))
    early = _pairs(matrix, (t[:, None] < T / 4) & (t[None, :] < T / 4))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    hist_bins = np.linspace(-1, 1, 41)
    ax.hist(every, bins=hist_bins, density=True, color="tab:green", alpha=0.55,
            label=f"all pairs, t in [0, {T}) (n={len(every)}, mean {every.mean():.2f})")
    if len(early):
        ax.hist(early, bins=hist_bins, density=True, color="tab:cyan", alpha=0.55, edgecolor="tab:blue",
                label=f"pairs in [0, {T // 4}) (n={len(early)}, mean {early.mean():.2f})")
    else:
        ax.plot([], [], " ", label=f"no pair of timesteps inside [0, {T // 4}): use more bins")
    ax.set_xlim(-1, 1)
    ax.set_xlabel("cosine similarity of loss gradients")
    ax.set_ylabel("density")
    fig.suptitle("Distribution of pairwise gradient similarity", fontsize=10)
    ax.set_title(_subtitle(settings), fontsize=7, color="0.35")
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    _replace(Path(path), lambda tmp: fig.savefig(tmp, format="png"), ".png")
    plt.close(fig)
