"""Plots that sit next to the numbers they draw: the merge weight search, the loss by timestep and a range's
training curves."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")            # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _shape_key(weights: Sequence[float]) -> tuple:
    total = sum(weights)
    return tuple(round(w / total, 6) for w in weights) if total else ()


def search_plot(log: dict, path: Path) -> Path:
    """Every scored candidate of a weight search (merge.json's "search" log), drawn as its strategy's candidates are
    best read: a scaled search by the sum of the weights (`_by_sum`), the others in the order scored with every
    candidate's weights (`_in_order`)."""
    plt = _pyplot()
    fig = SEARCH_PLOTS.get(log.get("strategy"), _in_order)(plt, log)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _in_order(plt, log: dict):
    """Top: each candidate's score in the order scored, the best so far as a step line, theta dashed, the best
    starred. Below: each candidate's weight per range (a column per candidate), so every merge tried can be read
    off."""
    import numpy as np

    cands = log["candidates"]
    k = np.arange(1, len(cands) + 1)
    scores = [c["score"] for c in cands]
    weights = np.array([c["weights"] for c in cands], dtype=float).T          # ranges x candidates
    fig, (ax, hm) = plt.subplots(2, 1, figsize=(max(6.4, min(16.0, 0.12 * len(cands) + 3)), 5.6), dpi=120,
                                 layout="constrained", sharex=True, height_ratios=[3, max(1, len(weights)) * 0.35])
    ax.plot(k, scores, "o", ms=4, color="tab:blue", label="candidate")
    ax.step(k, np.minimum.accumulate(scores), where="post", color="tab:blue", lw=1, alpha=0.5, label="best so far")
    theta = next((c for c in cands if not any(c["weights"])), None)
    if theta is not None:
        ax.axhline(theta["score"], ls="--", color="k", lw=1, label="theta (the base, all weights 0)")
    best = log.get("best") or min(cands, key=lambda c: c["score"])
    i = next(j for j, c in enumerate(cands) if c["weights"] == best["weights"])
    ax.plot([i + 1], [best["score"]], "*", ms=14, color="crimson",
            label="best: " + ", ".join(f"{w:.3g}" for w in best["weights"]))
    ax.set_ylabel(f"{log.get('objective', 'score')} (lower is better)")
    method = f" ({log['method']})" if log.get("method") else ""
    ax.set_title(f"weight search: {log.get('strategy')}{method}, {len(cands)} merges scored", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    im = hm.imshow(weights, aspect="auto", cmap="viridis", interpolation="nearest",
                   extent=(0.5, len(cands) + 0.5, len(weights) - 0.5, -0.5))
    hm.set_yticks(range(len(weights)), [f"w{r}" for r in range(len(weights))], fontsize=7)
    hm.set_xlabel("candidate (in the order scored); weights per range, low t first")
    fig.colorbar(im, ax=hm, pad=0.01, label="weight")
    return fig


def _by_sum(plt, log: dict):
    """Score against the sum of the weights, one line per weight shape (candidates that are multiples of each
    other), theta as a dashed line, the best starred."""
    cands = log["candidates"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120, layout="constrained")
    groups: dict[tuple, list] = {}
    for c in cands:
        groups.setdefault(_shape_key(c["weights"]), []).append(c)
    theta = groups.pop((), None)
    lines = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    for key, cs in lines[:8]:                        # the most-swept shapes as lines; the rest as points below
        cs = sorted(cs, key=lambda c: sum(c["weights"]))
        label = "shape " + ", ".join(f"{x:.3g}" for x in key) if len(cs) > 1 else None
        ax.plot([sum(c["weights"]) for c in cs], [c["score"] for c in cs], "o-" if len(cs) > 1 else "o",
                ms=4, label=label, color=None if len(cs) > 1 else "0.6")
    for _, cs in lines[8:]:
        ax.plot([sum(c["weights"]) for c in cs], [c["score"] for c in cs], "o", ms=3, color="0.6")
    if theta:
        ax.axhline(theta[0]["score"], ls="--", color="k", lw=1, label="theta (the base, all weights 0)")
    best = log.get("best") or min(cands, key=lambda c: c["score"])
    ax.plot([sum(best["weights"])], [best["score"]], "*", ms=14, color="crimson",
            label="best: " + ", ".join(f"{w:.3g}" for w in best["weights"]))
    ax.set_xlabel("sum of the merge weights")
    ax.set_ylabel(f"{log.get('objective', 'score')} (lower is better)")
    ax.set_title(f"weight search: {log.get('strategy')}, {len(cands)} merges scored", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


SEARCH_PLOTS = {"scaled": _by_sum}      # strategy -> how its candidates are drawn (default: _in_order)


def loss_by_t_plot(curves: dict, path: Path, title: str) -> Path:
    """curves: {model: loss_by_t record}; each record's `ratio` (loss / the base's) as a step over its own bins'
    edges (models scored with other bins show their own steps), with a point at each bin's centre."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=120, layout="constrained")
    ax.axhline(1.0, color="k", lw=1, ls="--")
    counts = {len(rec["bins"]) for rec in curves.values()}
    for k, (model, rec) in enumerate(curves.items()):
        edges = [lo for lo, _ in rec["bins"]] + [rec["bins"][-1][1]]
        centres = [(lo + hi) / 2 for lo, hi in rec["bins"]]
        mean = sum(rec["ratio"]) / len(rec["ratio"])
        bins = f", {len(rec['bins'])} bins" if len(counts) > 1 else ""
        line = ax.stairs(rec["ratio"], edges, baseline=None, lw=1.4, label=f"{model} (mean {mean:.4f}{bins})",
                         color="k" if model == "base" else f"C{k % 10}")   # stairs do not take the cycle
        ax.plot(centres, rec["ratio"], "o", ms=3, color=line.get_edgecolor())
    ax.set_xlabel("timestep t (each step spans its bin [lo, hi))")
    ax.set_ylabel("held-out loss / base model's loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _running_mean(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for k, v in enumerate(values):
        total += v - (values[k - window] if k >= window else 0.0)
        out.append(total / min(k + 1, window))
    return out


def training_curves(lines: Sequence[dict], path: Path, title: str, expected_fraction: float | None = None) -> Path:
    """A range's metrics.jsonl lines against the step, in three panels: the loss with its denoising and consistency
    terms (log scale), the gradient norm before clipping, and the fraction of timesteps drawn inside the range
    (a running mean over 5% of the steps; `expected_fraction`, (1 - p) + p (hi - lo) / T, dashed)."""
    plt = _pyplot()
    steps = [x["step"] for x in lines]
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.4), dpi=100, layout="constrained")
    for key, style in (("loss", "-"), ("denoise_loss", "--"), ("consistency_loss", ":")):
        pts = [(s, x[key]) for s, x in zip(steps, lines) if isinstance(x.get(key), (int, float)) and x[key] > 0]
        if pts:
            axes[0].plot(*zip(*pts), style, lw=1, label=key)
    axes[0].set_yscale("log")
    axes[0].set_title("loss (log scale)", fontsize=9)
    axes[0].legend(fontsize=7)
    pts = [(s, x["grad_norm"]) for s, x in zip(steps, lines) if isinstance(x.get("grad_norm"), (int, float))]
    if pts:
        axes[1].plot(*zip(*pts), lw=1, color="tab:purple")
    axes[1].set_title("gradient norm (before clipping)", fontsize=9)
    pts = [(s, x["t_in_range_fraction"]) for s, x in zip(steps, lines)
           if isinstance(x.get("t_in_range_fraction"), (int, float))]
    if pts:
        xs, ys = zip(*pts)
        axes[2].plot(xs, ys, ".", ms=2, color="0.7")
        axes[2].plot(xs, _running_mean(ys, max(1, len(ys) // 20)), lw=1.2, color="tab:green", label="running mean")
    if expected_fraction is not None:
        axes[2].axhline(expected_fraction, ls="--", color="k", lw=1, label=f"expected {expected_fraction:.3g}")
    axes[2].set_ylim(-0.05, 1.05)
    axes[2].set_title("fraction of t inside the range", fontsize=9)
    axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
